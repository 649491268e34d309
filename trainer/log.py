"""The product's one logging path: every trainer module logs through `get_logger(__name__)`, and every line
reads `[dolly-train] message`, the tag `dolly-train train` keeps on the terminal (trainer/quiet.py). The
evaluator's lines read `[dolly-eval] message` (evaluator/cli.py), the same format.

dolly-train's lines below ERROR go to stdout, ERROR and above to stderr (dolly-eval's all to stderr: its stdout
is the summary table); the stream is looked up for each line, so pytest's capture and quiet_output's redirects
see them. The loggers do not propagate: Ray workers and libraries configuring the root logger change nothing.
"""

from __future__ import annotations

import logging
import sys

TAG = "[dolly-train]"
ROOT = "dolly_train"


class TaggedHandler(logging.Handler):
    """`TAG message` lines; records at `stderr_from` and above go to stderr, the others to stdout."""

    def __init__(self, tag: str, stderr_from: int = logging.ERROR):
        super().__init__()
        self.stderr_from = stderr_from
        self.setFormatter(logging.Formatter(f"{tag} %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= self.stderr_from else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


def configure(root: str, tag: str, stderr_from: int = logging.ERROR) -> logging.Logger:
    """The product logger `root` (once): INFO and up, tagged lines, not propagated to the root logger."""
    logger = logging.getLogger(root)
    if not any(isinstance(h, TaggedHandler) for h in logger.handlers):
        logger.addHandler(TaggedHandler(tag, stderr_from))
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    """dolly-train's logger for module `name`."""
    configure(ROOT, TAG)
    return logging.getLogger(f"{ROOT}.{name.removeprefix('trainer.')}")


def datasets_progress_bars() -> None:
    """`datasets`' progress bars (save_to_disk, load_from_disk, load_dataset) only on a terminal: CI logs, Ray
    workers and pipes get none. Call before the first `datasets` call that would show one."""
    import datasets

    if sys.stderr.isatty():
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
