"""Shared fixtures. Session-scoped artifacts are built once, for real (no stand-ins):
the tiny Mistral model with the real v3 tokenizer, and a prepared synthetic Dolly data dir."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
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


_PYTEST_PID = os.getpid()


def _interrupt_on_sigterm(signum, frame):
    if os.getpid() != _PYTEST_PID:  # a child forked from pytest (multiprocessing): the default, exit at once
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: `timeout` signals both pytest and its process group
    raise KeyboardInterrupt(f"signal {signum}")


# SIGTERM (`timeout`, a cancelled CI job) ends the session like Ctrl-C: pytest stops and still runs the cleanup
# below; Python's default for SIGTERM is to exit at once, leaving the temp dir and every process behind.
signal.signal(signal.SIGTERM, _interrupt_on_sigterm)


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
    import multiprocessing.util

    kill_stray_processes(keep_children=False)
    time.sleep(0.5)  # let the kernel reap them before their files go
    # Removed when pytest exits, just after multiprocessing removes the temp dir it made there (pymp-*, exit
    # priority -100): removed now, that finalizer printed a traceback (FileNotFoundError) at the end of every run.
    multiprocessing.util.Finalize(None, shutil.rmtree, args=(str(SESSION_TMP),), kwargs={"ignore_errors": True},
                                  exitpriority=-200)


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


# ---- one Ray cluster for the session's `dolly-train train` runs ------------------------------------------

# What `dolly-train train` sets for the local cluster it starts itself (trainer/launch.py, RAY_TRAIN_LOCAL_ENV):
# a run that joins the session's cluster instead gets the same Ray Train settings as one that starts its own.
LOCAL_RUN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}


@pytest.fixture(scope="session")
def ray_cluster() -> dict[str, str]:
    """A local Ray cluster (`ray start --head --block`, no dashboard, 4 logical CPUs) shared by the session's
    `dolly-train train` runs: each run joins it through RAY_ADDRESS, as on KubeRay, instead of starting and
    stopping its own (ray.init + ray.shutdown: 5-25 s each on 2 cores). Returns the env a run needs. Tests that
    need a cluster of their own (token auth, a dashboard, the in-process start itself) keep their own.
    `ray start --block` runs in the foreground as a child of pytest: its GCS, raylet and worker processes are
    pytest's descendants (kept by the per-test stray-process check), all in its process group."""
    with ray_head() as run_env:
        yield run_env


@contextlib.contextmanager
def ray_head(node_env: dict[str, str] | None = None, name: str = "ray-head"):
    """`ray start --head --block` with `node_env` added to its environment (what a pod's env is on KubeRay:
    every Ray process of the node, the Train controller and workers included, inherits it); yields the env a
    `dolly-train train` needs to join it, and kills the whole cluster on exit."""
    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    # Free ports, never Ray's fixed defaults: GCS 6379, and the dashboard agent's HTTP port 52365, which the chart
    # contract test's head needs for its job agent while this cluster is up (other sessions may run Ray too).
    port, agent_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(node_env or {})}
    env.pop("RAY_ADDRESS", None)
    log_path = SESSION_TMP / f"{name}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
             "--dashboard-agent-listen-port", str(agent_port), "--num-cpus", "4", "--include-dashboard", "false",
             "--disable-usage-stats",
             "--temp-dir", os.environ["RAY_TMPDIR"]],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run_env = {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", **LOCAL_RUN_ENV}
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"the session's Ray head exited: {log_path.read_text()[-4000:]}"
            probe = subprocess.run([sys.executable, "-c", "import ray; ray.init(); ray.shutdown()"],
                                   env={**env, **run_env}, capture_output=True, text=True, timeout=120)
            if probe.returncode == 0:
                break
            assert time.time() < deadline, f"the session's Ray head is not up after 180 s: {probe.stderr[-3000:]}"
            time.sleep(1)
        yield run_env
    finally:
        if proc.poll() is None:
            # All of it at once: a graceful SIGTERM stops Ray's processes in turn, with waits (34-39 s measured
            # for a head with a dashboard); the cluster holds nothing to save, and its files go with SESSION_TMP.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

