"""Shared fixtures. Session-scoped artifacts are built once, for real (no stand-ins):
the tiny Mistral model with the real v3 tokenizer, and a prepared synthetic Dolly data dir."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Everything a test session writes outside the repo lives under one directory that the session removes at
# its end, failed tests included: pytest's tmp_path dirs, Ray's session dirs (RAY_TMPDIR), vLLM's IPC sockets
# and every other temp file of the processes the tests start (TMPDIR), torch extensions builds. Short path:
# Ray's and vLLM's unix sockets live below it (107-byte limit).
SESSION_TMP = Path(tempfile.mkdtemp(prefix="dolly-tests-"))
for _var, _sub in (("TMPDIR", "tmp"), ("RAY_TMPDIR", "ray"), ("TORCH_EXTENSIONS_DIR", "torch_extensions")):
    (SESSION_TMP / _sub).mkdir()
    os.environ[_var] = str(SESSION_TMP / _sub)
tempfile.tempdir = None  # recomputed from TMPDIR: pytest's basetemp goes there too


def _session_processes() -> dict[int, int]:
    """pid -> parent pid of every other process started under this session's TMPDIR (processes inherit it;
    Ray's daemons outlive a killed driver by being re-parented, but keep it)."""
    marker = f"TMPDIR={os.environ['TMPDIR']}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return found


def kill_stray_processes(keep_children: bool) -> list[int]:
    """SIGKILL the session's processes that no test owns any more: with `keep_children`, those not descended
    from this pytest process (a live fixture may own those), else all of them. Returns the pids."""
    procs = _session_processes()

    def ours(pid: int) -> bool:
        seen = set()
        while pid in procs and pid not in seen:
            seen.add(pid)
            pid = procs[pid]
        return pid == os.getpid()

    victims = [pid for pid in procs if not (keep_children and ours(pid))]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return victims


@pytest.fixture(autouse=True)
def _no_stray_processes():
    """After each test: no process it started outlives it (a timed-out `dolly-train train` leaves Ray's
    raylet and GCS behind; a crashed vLLM run its engine process)."""
    yield
    stray = kill_stray_processes(keep_children=True)
    if stray:
        print(f"[conftest] killed {len(stray)} stray process(es) left by this test: {stray}")


@pytest.hookimpl(trylast=True)  # after pytest's own tmp_path bookkeeping
def pytest_sessionfinish(session, exitstatus):
    kill_stray_processes(keep_children=False)
    time.sleep(0.5)  # let the kernel reap them before their files go
    shutil.rmtree(SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is missing (a user's clone without ../shared): CRD-schema checks need it")
    return SHARED


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from trainer.tiny_model import init_tiny_model

    return init_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """600 synthetic records -> prepare (max length 512), 48 validation, 48 test."""
    from trainer.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare(source="synthetic", out=out, tokenizer=tiny_model_dir, max_length=512,
            num_examples=600, seed=0, val_size=48, test_size=48)
    return out
