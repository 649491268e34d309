"""Preemption as a worker pod sees it: KubeRay's worker container command as PID 1 of its own PID namespace.

A node drain or spot reclaim deletes a worker pod. The kubelet then runs the container's preStop hook, sends
SIGTERM to the container's PID 1 and, `terminationGracePeriodSeconds` after the deletion began, SIGKILL. KubeRay
v1.7.0 gives the Ray container the command `/bin/bash -c -- "ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536};
ray start ... --block"` (ray-operator/controllers/ray/common/pod.go, BuildPod and generateRayStartCommand;
utils.GetContainerCommand). This test builds that command from the chart's rendered worker group exactly as
BuildPod does, runs it as PID 1 of a new PID and mount namespace (`unshare --pid --fork --mount-proc`, with a
private tmpfs at /dev/shm of the rendered shmSize: the pod's emptyDir), two such "pods" holding the two Ray Train
workers of a CPU run (values-cpu-smoke.yaml: 2 worker pods of 1 CPU, one rank each), and the head outside them.
Mid-run it deletes one pod as the kubelet does: the chart's preStop command inside that pod's namespaces, then
SIGTERM to its PID 1, SIGKILL at the grace period. It asserts the interrupted step finished and its checkpoint was
complete before the grace period ended, then starts the replacement pod (what KubeRay does for a fixed-size group)
and asserts the resumed run logged every step exactly once.

What differs from a pod, and why: the head is a plain `ray start --head` (it is not under test); the pods share the
host's network namespace, so two ports KubeRay fixes per pod (`--metrics-export-port=8080`,
`--dashboard-agent-listen-port=52365`) are given free ports instead, and `--address` is the local head; the
volume paths (HF_HOME) point into the test's temp dir; Ray token auth is off (RAY_AUTH_MODE=disabled). The rest of
the command, the environment the chart renders and the preStop script are used as rendered. Runs as root (CI here)
and is skipped where `unshare` cannot make namespaces. It runs on this machine's Python and bash (5.2), not inside
the CPU image (docs/operations.md says what that leaves open).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

import k8s_validate as kv

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "dolly-train"
MAX_STEPS = 12


# ---- KubeRay v1.7.0's command construction (ray-operator/controllers/ray/common/pod.go) ----------------------

def quantity_value(q) -> int:
    """resource.Quantity.Value(): the value rounded up to an integer ("500m" -> 1, "3Gi" -> 3221225472)."""
    s = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if s.endswith("m"):
        return -(-int(s[:-1]) // 1000)
    for suffix, factor in units.items():
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * factor)
    return -(-int(float(s) * 1000) // 1000)


def convert_param_map(params: dict[str, str]) -> str:
    """convertParamMap: sorted keys, " --key " for "true", nothing for "false" (but for three options that take
    an explicit boolean), " --key=value " otherwise."""
    special = {"log-color", "include-dashboard", "include-log-monitor"}
    out = ""
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in special:
            if value.lower() == "true":
                out += f" --{key} "
        else:
            out += f" --{key}={value} "
    return out


def kuberay_worker_command(group: dict, head_address: str) -> list[str]:
    """Command + args of the worker group's Ray container after BuildPod (setMissingRayStartParams,
    generateRayStartCommand, GetContainerCommand)."""
    container = group["template"]["spec"]["containers"][0]
    user_cmd = " ".join(container.get("command") or []) + " ".join(container.get("args") or [])
    assert "ray start" not in user_cmd and not user_cmd, "the chart leaves the command to KubeRay"
    params = {k: str(v).lower() if isinstance(v, bool) else str(v)
              for k, v in (group.get("rayStartParams") or {}).items()}
    params.setdefault("address", head_address)  # <fqdnRayIP>:<headPort> in a cluster
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", "52365")
    limits, requests = container["resources"].get("limits", {}), container["resources"].get("requests", {})
    if "num-cpus" not in params:
        cpu = limits.get("cpu") or requests.get("cpu")
        if cpu is not None and quantity_value(cpu):
            params["num-cpus"] = str(quantity_value(cpu))
    if "memory" not in params and limits.get("memory"):
        params["memory"] = str(quantity_value(limits["memory"]))
    gpus = limits.get("nvidia.com/gpu")
    if "num-gpus" not in params and gpus and quantity_value(gpus):
        params["num-gpus"] = str(quantity_value(gpus))
    ray_start = f"ray start {convert_param_map(params)}"
    return ["/bin/bash", "-c", "--", f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {ray_start}"]


def test_kuberay_command_construction_matches_kuberays_own_tests():
    """Oracle: KubeRay v1.7.0's pod_test.go. TestBuildPod (line ~799) compares the worker's args as a sorted list
    of words; TestGenerateRayStartCommand (~2230) the exact spacing (" --key=value " per flag)."""
    group = {"rayStartParams": {"port": "6379"}, "template": {"spec": {"containers": [{"resources": {
        "limits": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "3"}}}]}}}
    cmd = kuberay_worker_command(group, "raycluster-sample-head-svc.default.svc.cluster.local:6379")
    assert cmd[:3] == ["/bin/bash", "-c", "--"]
    expected = ("ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; ray start --block "
                "--dashboard-agent-listen-port=52365 --memory=1073741824 --num-cpus=1 --num-gpus=3 "
                "--address=raycluster-sample-head-svc.default.svc.cluster.local:6379 --port=6379 "
                "--metrics-export-port=8080")
    assert sorted(cmd[3].split()) == sorted(expected.split())
    assert convert_param_map({"num-gpus": "1"}) == " --num-gpus=1 "
    assert quantity_value("500m") == 1 and quantity_value("3Gi") == 3 * 2**30


# ---- the scenario --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendered_worker_group() -> tuple[dict, int]:
    res = subprocess.run([kv.tool("helm"), "template", "dolly-train", str(CHART), "-f",
                          str(CHART / "values-cpu-smoke.yaml")], capture_output=True, text=True, timeout=60,
                         check=True)
    (job,) = [o for o in yaml.safe_load_all(res.stdout) if o and o["kind"] == "RayJob"]
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group, int(group["template"]["spec"]["terminationGracePeriodSeconds"])


def shm_size(group: dict) -> str:
    (vol,) = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    return vol["emptyDir"]["sizeLimit"].replace("Mi", "m").replace("Gi", "g")


class Pod:
    """One worker "pod": KubeRay's command as PID 1 of new PID + mount namespaces."""

    STARTED = "This command will now block forever"  # `ray start --block` once its node is registered

    def __init__(self, name: str, command: list[str], env: dict, shm: str, log_dir: Path):
        self.name, self.log = name, log_dir / f"{name}.log"
        # The tmpfs is mounted by a shell that then execs the container command: PID 1 is KubeRay's bash (and,
        # bash execing the last command of a -c string, then `ray start` itself).
        setup = f"mount -t tmpfs -o size={shm} tmpfs /dev/shm && exec \"$@\""
        # Ray waits a fixed 30 s for a new raylet to register with the GCS (ray/_private/node.py); on two
        # shared cores it can take longer and `ray start` exits 1. A pod's container restarts then (KubeRay's
        # pods: restartPolicy Always), so this does the same, at most three times.
        for attempt in range(3):
            with self.log.open("a") as fh:
                self.proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--", "/bin/bash", "-c",
                                              setup, "pod", *command], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            self.pid1 = self._child()
            deadline = time.time() + 180
            while time.time() < deadline and self.proc.poll() is None and self.STARTED not in self.log.read_text():
                time.sleep(0.5)
            if self.proc.poll() is None and self.STARTED in self.log.read_text():
                return
            self.stop()
        raise AssertionError(f"{self.name}: `ray start` did not come up in three tries: {self.log.read_text()[-3000:]}")

    def _child(self) -> int:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except OSError:
                children = []
            if children:
                return int(children[0])
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no PID 1 after 30 s")

    def ns_pid1_cmdline(self) -> str:
        return Path(f"/proc/{self.pid1}/cmdline").read_bytes().replace(b"\0", b" ").decode()

    def exec(self, command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        """What the kubelet's exec hook does: the command inside the container's namespaces, its environment."""
        return subprocess.run(["nsenter", "--target", str(self.pid1), "--pid", "--mount", "--", *command],
                              env=env, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if r["kind"] == "train"]


def wait_for(pred, timeout: float, what: str, check=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check is not None:
            check()
        value = pred()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def namespaces_work(tmp_path):
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("unshare/nsenter (util-linux) are not installed")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--", "/bin/bash", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs /dev/shm && echo $$"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or probe.stdout.strip() != "1":
        pytest.skip(f"cannot make PID/mount namespaces here (needs root): {probe.stderr.strip()}")


def test_pod_deletion_saves_the_step_then_the_replacement_pod_resumes(tmp_path, tiny_model_dir,
                                                                       synthetic_data_dir, namespaces_work):
    group, grace = rendered_worker_group()
    container = group["template"]["spec"]["containers"][0]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert group["replicas"] == 2 and grace == 300

    from ray._private.services import get_node_ip_address

    # Every node on the address Ray picks by itself (as each pod does with its pod IP): a worker node must reach
    # the head at the address the head registered.
    head_port = free_port()
    head_address = f"{get_node_ip_address()}:{head_port}"
    ray_bin = Path(sys.executable).parent / "ray"
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    run_marker = f"DOLLY_TEST_POD_RUN={uuid.uuid4().hex}"  # every process of this test inherits it: cleanup finds them
    base.update(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(REPO),
                RAY_AUTH_MODE="disabled", DOLLY_TEST_POD_RUN=run_marker.split("=", 1)[1])
    # The worker container's environment as rendered, less what only an API server gives (fieldRef) and the
    # progress target (no API server here); HF_HOME on the test's volume.
    pod_env = dict(base)
    for e in container["env"]:
        if "value" in e and e["name"] != "DOLLY_RAYJOB_NAME":
            pod_env[e["name"]] = e["value"]
    pod_env["HF_HOME"] = str(tmp_path / "hf-cache")
    assert pod_env["DOLLY_SIGTERM_PID_DIR"].startswith("/dev/shm/")

    def pod_command() -> list[str]:
        cmd = kuberay_worker_command(group, head_address)
        args = cmd[3]
        assert " --metrics-export-port=8080 " in args and " --dashboard-agent-listen-port=52365 " in args
        args = args.replace("--metrics-export-port=8080", f"--metrics-export-port={free_port()}")
        args = args.replace("--dashboard-agent-listen-port=52365", f"--dashboard-agent-listen-port={free_port()}")
        return [*cmd[:3], args]

    logs = tmp_path / "logs"
    logs.mkdir()
    head_log = (logs / "head.log").open("w")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--port", str(head_port),
                             "--num-cpus", "0", "--num-gpus", "0",
                             "--include-dashboard", "false", "--dashboard-agent-listen-port", str(free_port()),
                             "--disable-usage-stats"], env=base, stdout=head_log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    pods: list[Pod] = []
    driver = None
    try:
        shm = shm_size(group)
        pods = [Pod(f"worker-{i}", pod_command(), pod_env, shm, logs) for i in range(2)]
        for pod in pods:
            # PID 1 is `ray start` itself: bash 5.x execs the last command of its -c string.
            assert re.search(r"ray start .*--block", pod.ns_pid1_cmdline()), pod.ns_pid1_cmdline()

        run_dir = tmp_path / "runs" / "pod"
        driver_log = logs / "driver.log"
        with driver_log.open("w") as fh:
            driver = subprocess.Popen(
                [sys.executable, "-m", "trainer.cli", "train", "--config", "cpu-tiny", f"model.path={tiny_model_dir}",
                 f"data.path={synthetic_data_dir}", f"checkpoint.storage_path={tmp_path / 'runs'}",
                 "checkpoint.run_name=pod", "data.max_length=512", "batch.micro_batch_size=2",
                 f"schedule.max_steps={MAX_STEPS}", "checkpoint.every_steps=100", "logging.every_steps=1",
                 "logging.eval_every_steps=100", "checkpoint.export=false", "checkpoint.max_failures=3"],
                env={**base, "RAY_ADDRESS": head_address}, stdout=fh, stderr=subprocess.STDOUT)

        def driver_alive():
            assert driver.poll() is None, driver_log.read_text()[-5000:]
            for pod in pods:
                assert pod.proc.poll() is None, f"{pod.name} exited: {pod.log.read_text()[-3000:]}"

        def registered(pod: Pod) -> list[str]:
            res = pod.exec(["/bin/bash", "-c", 'ls "$DOLLY_SIGTERM_PID_DIR" 2>/dev/null'], pod_env, 30)
            return res.stdout.split()

        wait_for(lambda: len(train_steps(run_dir)) >= 3, 600, "step 3", driver_alive)
        victim = next(p for p in pods if registered(p))  # a pod holding a rank (each holds one)
        assert len(registered(victim)) == 1, registered(victim)
        after = train_steps(run_dir)[-1]

        # ---- the kubelet deletes the pod: preStop, then SIGTERM to PID 1, SIGKILL at the grace period ----
        t0 = time.time()
        hook = victim.exec(pre_stop, pod_env, timeout=grace)
        t_hook = time.time()
        victim_log = victim.log.read_text()
        assert hook.returncode == 0, hook.stdout + hook.stderr
        assert "[dolly-train] preStop: SIGTERM sent to training processes: " in victim_log, victim_log[-3000:]
        assert "still running: none" in victim_log, victim_log[-3000:]
        os.kill(victim.pid1, signal.SIGTERM)
        try:
            victim.proc.wait(timeout=max(t0 + grace - time.time(), 1))
            t_exit = time.time()
        except subprocess.TimeoutExpired:
            victim.stop()
            raise AssertionError(f"the pod's PID 1 did not exit within the grace period: {victim_log[-3000:]}")

        out = driver_log.read_text()
        assert "rank" in out and ": SIGTERM received; finishing the current step" in out, out[-5000:]
        # one checkpoint, the SIGTERM one (every_steps=100 leaves no periodic checkpoint in reach)
        markers = sorted(run_dir.glob("checkpoint_*/COMPLETE.json"))
        assert len(markers) == 1, sorted(p.name for p in run_dir.iterdir())
        marker = markers[0]
        saved = int(marker.parent.name.split("_")[1])
        assert after <= saved <= after + 3, (after, saved)
        full_log = Path(re.search(r"full log \(Ray, DeepSpeed\): (\S+)", out).group(1)).read_text()
        assert f"stopped on SIGTERM after step {saved} and saved checkpoint_{saved:08d}" in full_log
        assert marker.stat().st_mtime < t_hook <= t0 + grace  # saved while the hook waited, before the deadline
        assert t_exit < t0 + grace
        print(f"preStop {t_hook - t0:.1f} s, pod gone {t_exit - t0:.1f} s after deletion (grace {grace} s); "
              f"checkpoint_{saved:08d}")

        # ---- KubeRay replaces the pod; the run resumes there ----
        pods.append(Pod("worker-replacement", pod_command(), pod_env, shm, logs))
        driver.wait(timeout=900)
        out = driver_log.read_text()
        assert driver.returncode == 0, out[-6000:]
        resumed = re.search(r"resumed from (\S+) at step (\d+)", out)
        assert resumed and int(resumed.group(2)) == saved, out[-5000:]
        assert train_steps(run_dir) == list(range(1, MAX_STEPS + 1)), train_steps(run_dir)
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        for pod in pods:
            pod.stop()
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        head_log.close()
        kill_marked(run_marker)  # Ray daemons that left the process groups (a new session)


def kill_marked(marker: str) -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            continue
