"""The product's one logging path: every module logs through `get_logger(__name__)`, and every line reads
`[dolly-train] message`, the tag `dolly-train train` keeps on the terminal (trainer/quiet.py).

Lines below ERROR go to stdout, ERROR and above to stderr; the stream is looked up for each line, so pytest's
capture and quiet_output's redirects see them. The logger does not propagate: Ray workers and library code
configuring the root logger change nothing here.
"""

from __future__ import annotations

import logging
import sys

TAG = "[dolly-train]"
ROOT = "dolly_train"


class _Handler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.ERROR else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


def get_logger(name: str) -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = _Handler()
        handler.setFormatter(logging.Formatter(f"{TAG} %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logging.getLogger(f"{ROOT}.{name.removeprefix('trainer.')}")
