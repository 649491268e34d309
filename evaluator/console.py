"""What `dolly-eval run` shows on the terminal: its own `[dolly-eval]` lines, nothing of vLLM's internals.

Quiet by default, as `dolly-train train` is (trainer/quiet.py, the same mechanism): file descriptors 1 and 2 go to
a log file, so vLLM's logger, its C++ and Triton output, the engine-core process it may start (which inherits
them) and every other library land there; only the `[dolly-eval]` lines are copied to the terminal's stderr
(stdout stays the summary table). During the run the log is `.<out>.eval.log` beside the output folder (the
folder itself is written atomically at the end); it then becomes `<out>/eval.log` (a hard link, so lines written
later still reach it), and the "wrote" line names it. A failed run keeps it as `<out>.failed.log` and says so.
`dolly-eval run --verbose` prints everything instead.

What in that log matters for the result is said on the terminal: prompt truncation (evaluator/run.py), an engine
setting vLLM changed from what was asked (`engine_changes`), and vLLM's errors and the warnings in which it falls
back, overrides or truncates something (`VllmWarnings`); the other vLLM warnings are counted in the "wrote" line.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from evaluator.config import EvalInputError
from trainer.quiet import quiet_output

log = logging.getLogger("dolly-eval")

TAG = "[dolly-eval]"
LOG_NAME = "eval.log"
# vLLM's own format (vllm/logger.py): "(EngineCore pid=12) WARNING 12-06 03:40:02 [file.py:12] message"
_VLLM_LINE = re.compile(r"pid=\d+\)\s+(WARNING|ERROR|CRITICAL)\s+\d\d-\d\d \d\d:\d\d:\d\d\s+\[[^\]]*\]\s?(.*)")
SHOWN_CHARS = 160


# vLLM's warnings that say it did something other than asked, which a reader of the result should know. The
# others (on a CPU: no Triton, no tcmalloc, thread binding, a chat-template warmup that a tokenizer-less engine
# cannot do) are counted only.
_NOTABLE = re.compile(r"fall(?:s|ing)? ?back|\binstead\b|\boverrid|\btruncat|\bexceed", re.I)


@dataclass
class VllmWarnings:
    """vLLM's WARNING/ERROR lines seen in the log (`watch` is quiet_output's hook)."""

    count: int = 0
    notable: list[str] = field(default_factory=list)  # errors, fallbacks, overrides: distinct, in order

    def watch(self, line: str) -> None:
        m = _VLLM_LINE.search(line)
        if not m:
            return
        self.count += 1
        level, text = m.group(1), m.group(2).strip()
        if level != "WARNING" or _NOTABLE.search(text):
            said = f"vLLM {'warned' if level == 'WARNING' else 'reported an error'}: " + (
                text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + " ...")
            if said not in self.notable:
                self.notable.append(said)


@dataclass
class QuietRun:
    path: Path  # where the log is being written now
    final: Path  # where it ends up once the run folder is written
    warnings: VllmWarnings


@contextmanager
def quiet_run(out: str | Path) -> Iterator[QuietRun]:
    """`dolly-eval run`'s terminal: the log beside `out` during the run, `out/eval.log` after (see the module)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    q = QuietRun(out.parent / f".{out.name}.eval.log", out / LOG_NAME, VllmWarnings())
    q.path.unlink(missing_ok=True)
    failed: BaseException | None = None
    try:
        with quiet_output(q.path, tag=TAG, banner=None, terminal_fd=2, watch=q.warnings.watch):
            yield q
    except BaseException as e:
        failed = e
        raise
    finally:
        if failed is None or isinstance(failed, EvalInputError):  # bad input: nothing ran worth keeping
            q.path.unlink(missing_ok=True)
        elif q.path.exists():
            kept = out.with_name(out.name + ".failed.log")
            os.replace(q.path, kept)
            print(f"{TAG} the run failed; its full log (vLLM, libraries): {kept}", file=sys.stderr, flush=True)


def keep_log(q: QuietRun | None, folder: Path) -> None:
    """Put the run's log into the run folder being written (`folder`: atomic_dir's temp folder)."""
    if q is None:
        return
    try:
        os.link(q.path, folder / LOG_NAME)  # the same file: what is written after the swap still reaches it
    except OSError:  # a filesystem without hard links: what was written so far
        shutil.copyfile(q.path, folder / LOG_NAME)


def engine_changes(llm, kwargs: dict) -> list[str]:
    """Settings vLLM runs with that differ from what dolly-eval asked for, in words (empty when none did)."""
    cfg = getattr(llm.llm_engine, "vllm_config", None)  # internal attribute: no check on a vLLM without it
    if cfg is None:
        return []
    model, sched = cfg.model_config, cfg.scheduler_config
    asked = {"max_model_len": (kwargs.get("max_model_len"), model.max_model_len),
             "max_num_seqs": (kwargs.get("max_num_seqs"), sched.max_num_seqs),
             "enforce_eager": (kwargs.get("enforce_eager"), model.enforce_eager)}
    dtype = kwargs.get("dtype")
    if dtype not in (None, "auto"):
        asked["dtype"] = (dtype, str(model.dtype).removeprefix("torch."))
    return [f"vLLM changed an engine setting: {name} {want} asked for, {got} used"
            for name, (want, got) in asked.items() if want is not None and want != got]
