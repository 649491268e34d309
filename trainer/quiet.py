"""Quiet by default: the terminal shows dolly-train's own lines, a log file gets everything.

`dolly-train train` runs Ray, whose driver prints its internals (controller polls, placement groups, "Reporting
training result ...") next to the workers' output. `quiet_output(path)` points this process's stdout and stderr
(file descriptors 1 and 2, so Ray's C++ side and the processes it starts are included) at `path`, and a thread
copies to the terminal only the lines that carry the product's `[dolly-train]` tag (Ray's `(RayTrainWorker
pid=...)` prefix removed). `dolly-train train --verbose` skips all this. `dolly-eval run` uses the same
mechanism with its own tag, banner and terminal stream (evaluator/console.py), and a `watch` hook that sees every
line left in the log (it picks vLLM's warnings out of them).
"""

from __future__ import annotations

import os
import re
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from trainer.log import TAG

_ANSI = r"(?:\x1b\[[0-9;]*m)?"
_RAY_PREFIX = re.compile(rf"^{_ANSI}\([^)]*pid=\d+[^)]*\){_ANSI}\s*")


def keep(line: str, tag: str = TAG) -> str | None:
    """The terminal's version of a log line, or None to leave it in the log only."""
    if tag not in line:
        return None
    return _RAY_PREFIX.sub("", line)


BANNER = f"{TAG} full log (Ray, DeepSpeed): {{path}}  (--verbose prints it here)"


@contextmanager
def quiet_output(path: Path, tag: str = TAG, banner: str | None = BANNER, terminal_fd: int = 1,
                 watch: Callable[[str], None] | None = None) -> Iterator[None]:
    """Send fds 1 and 2 to `path`; copy the lines tagged `tag` to the terminal's `terminal_fd` (1 or 2), after
    printing `banner` (formatted with the path; None: no banner). `watch` gets every other line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(terminal_fd), "w", buffering=1)
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    start = os.fstat(log_fd).st_size
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    done = threading.Event()

    def follow() -> None:
        with open(path, errors="replace") as fh:
            fh.seek(start)
            buf = ""
            while True:
                chunk = fh.read()
                if chunk:
                    buf += chunk
                    *lines, buf = re.split(r"\r?\n", buf)
                    for line in lines:
                        out = keep(line, tag)
                        if out is not None:
                            terminal.write(out + "\n")
                        elif watch is not None:
                            watch(line)
                elif done.is_set():
                    return
                else:
                    done.wait(0.2)

    if banner:
        print(banner.format(path=path), file=terminal, flush=True)
    thread = threading.Thread(target=follow, name="dolly-quiet-follow", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        done.set()
        thread.join(timeout=5)
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        terminal.close()
