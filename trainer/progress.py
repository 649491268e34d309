"""Training progress where Kubernetes users look: an annotation on the run's own RayJob, and Ray metrics.

Rank 0 calls `report(recipe, kind, metrics)` at each logging interval ("train"), validation ("eval") and
checkpoint ("checkpoint"). It keeps a small summary and

- publishes it as JSON in the annotation `dolly-train.dev/progress` of its RayJob (a JSON merge patch on
  metadata.annotations), read by `dolly-train status|wait` and the Argo CD health check:

      {"step": 370, "total_steps": 1200, "epoch": 0.31, "percent": 30.8, "eta_seconds": 2520, "loss": 1.21,
       "val_loss": 1.25, "tokens_per_s": 8300.0, "last_checkpoint": "checkpoint_00000300",
       "updated_at": "2026-12-01T23:10:00Z"}

  The RayJob is named by DOLLY_RAYJOB_NAME and DOLLY_RAYJOB_NAMESPACE (the chart sets both on the worker pods,
  `progress.enabled`); without DOLLY_RAYJOB_NAME nothing is published. Credentials: the pod's service-account
  token and CA (/var/run/secrets/kubernetes.io/serviceaccount), the API at KUBERNETES_SERVICE_HOST:PORT; tests
  point DOLLY_KUBE_API (http://127.0.0.1:PORT) and DOLLY_KUBE_TOKEN_FILE at a local server instead.
- sets Ray gauges (`ray.util.metrics`, exported by each Ray node's metrics agent on port 8080 with Ray's
  `ray_` prefix): dolly_train_step, dolly_train_total_steps, dolly_train_loss, dolly_train_val_loss,
  dolly_train_tokens_per_s, dolly_train_eta_seconds, tagged with the run name.

Publishing never slows or fails training: the training thread only swaps in the newest summary (an older one not
yet sent is dropped); a daemon thread sends it with a short timeout. When the API cannot be reached or refuses the
patch, it logs one warning, backs off (5 s doubling to 5 min) and sends the newest summary on the next try; it
logs again once a patch succeeds.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone

from trainer.log import get_logger

ANNOTATION = "dolly-train.dev/progress"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
ENV_NAME, ENV_NAMESPACE = "DOLLY_RAYJOB_NAME", "DOLLY_RAYJOB_NAMESPACE"
ENV_API, ENV_TOKEN_FILE = "DOLLY_KUBE_API", "DOLLY_KUBE_TOKEN_FILE"
FIELD_MANAGER = "dolly-train-progress"  # owner of the annotation in managedFields (Argo CD's server-side apply leaves it)
REQUEST_TIMEOUT = 5.0  # seconds for one patch
BACKOFF_START, BACKOFF_MAX = 5.0, 300.0
FIELDS = ("step", "total_steps", "epoch", "percent", "eta_seconds", "loss", "val_loss", "tokens_per_s",
          "last_checkpoint", "updated_at")

log = get_logger(__name__)


def _warn(msg: str) -> None:
    # stdout (trainer/log.py): Ray workers' stdout reaches the driver and the submitter's log
    log.warning(f"warning: {msg}")


@dataclass
class Target:
    """Where the annotation goes: the RayJob `name` in `namespace` through the API server at `api`."""

    api: str
    namespace: str
    name: str
    token_file: str
    ca_file: str | None

    @classmethod
    def from_env(cls, env=None) -> "Target | None":
        env = os.environ if env is None else env
        name = env.get(ENV_NAME, "")
        if not name:
            return None
        namespace = env.get(ENV_NAMESPACE, "")
        if not namespace:
            try:
                with open(f"{SA_DIR}/namespace") as f:
                    namespace = f.read().strip()
            except OSError:
                namespace = "default"
        api = env.get(ENV_API, "")
        if not api:
            host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                _warn(f"{ENV_NAME}={name} is set but this pod has no KUBERNETES_SERVICE_HOST: progress is not "
                      "published")
                return None
            api = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        return cls(api=api.rstrip("/"), namespace=namespace, name=name,
                   token_file=env.get(ENV_TOKEN_FILE, f"{SA_DIR}/token"),
                   ca_file=None if api.startswith("http://") else f"{SA_DIR}/ca.crt")

    @property
    def url(self) -> str:
        return f"{self.api}/apis/ray.io/v1/namespaces/{self.namespace}/rayjobs/{self.name}?fieldManager={FIELD_MANAGER}"

    def patch(self, summary: dict, timeout: float = REQUEST_TIMEOUT) -> None:
        """One JSON merge patch of the annotation; raises OSError (URLError, HTTPError, timeouts) on failure."""
        body = json.dumps({"metadata": {"annotations": {ANNOTATION: json.dumps(summary, sort_keys=True)}}})
        with open(self.token_file) as f:  # re-read each time: projected tokens are rotated by the kubelet
            token = f.read().strip()
        req = urllib.request.Request(self.url, data=body.encode(), method="PATCH", headers={
            "Content-Type": "application/merge-patch+json", "Accept": "application/json",
            "Authorization": f"Bearer {token}"})
        ctx = ssl.create_default_context(cafile=self.ca_file) if self.url.startswith("https://") else None
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            resp.read()


class Publisher:
    """Sends the newest summary from a daemon thread; `submit` never blocks on the network."""

    def __init__(self, target: Target, timeout: float = REQUEST_TIMEOUT,
                 backoff: tuple[float, float] = (BACKOFF_START, BACKOFF_MAX)):
        self.target, self.timeout = target, timeout
        self.backoff_start, self.backoff_max = backoff
        self.sent = 0
        self._pending: dict | None = None
        self._busy = False
        self._closed = False
        self._failing = False
        self._retry_at = 0.0
        self._delay = self.backoff_start
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="dolly-train-progress", daemon=True)
        self._thread.start()

    def submit(self, summary: dict) -> None:
        with self._cond:
            self._pending = dict(summary)  # replaces an older summary not yet sent: only the newest matters
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._pending is None or time.monotonic() < self._retry_at):
                    wait = None if self._pending is None else max(self._retry_at - time.monotonic(), 0.01)
                    self._cond.wait(wait)
                if self._pending is None:
                    return  # closed and nothing left to send
                if self._closed and time.monotonic() < self._retry_at:
                    return  # closing while backing off: do not hold the worker's exit
                summary, self._pending, self._busy = self._pending, None, True
            ok = self._send(summary)
            with self._cond:
                self._busy = False
                if not ok and self._pending is None:
                    self._pending = summary  # retry it unless a newer one came meanwhile
                self._cond.notify_all()

    def _send(self, summary: dict) -> bool:
        try:
            self.target.patch(summary, self.timeout)
        except Exception as e:  # noqa: BLE001 - whatever goes wrong here must not reach training
            detail = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else repr(e)
            if not self._failing:
                _warn(f"cannot publish progress to RayJob {self.target.namespace}/{self.target.name} at "
                      f"{self.target.api} ({detail}); training goes on, retrying in the background")
            self._failing = True
            self._retry_at = time.monotonic() + self._delay
            self._delay = min(self._delay * 2, self.backoff_max)
            return False
        if self._failing:
            log.info(f"progress published to RayJob {self.target.namespace}/{self.target.name} again")
        self._failing, self._delay, self._retry_at = False, self.backoff_start, 0.0
        self.sent += 1
        return True

    def close(self, timeout: float = REQUEST_TIMEOUT + 1) -> None:
        """Send what is pending (unless the API is failing), waiting at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(max(deadline - time.monotonic(), 0))


class _Gauges:
    """Ray gauges of rank 0, tagged with the run name; absent outside Ray."""

    NAMES = {"step": "optimizer steps done", "total_steps": "optimizer steps in the run",
             "loss": "training loss (mean over the logging window)", "val_loss": "validation loss",
             "tokens_per_s": "real (non-padding) tokens per second, all workers",
             "eta_seconds": "estimated seconds until the last step"}

    def __init__(self, run: str):
        from ray.util.metrics import Gauge

        self.tags = {"run": run}
        self.gauges = {k: Gauge(f"dolly_train_{k}", description=d, tag_keys=("run",)) for k, d in self.NAMES.items()}

    def set(self, summary: dict) -> None:
        for key, gauge in self.gauges.items():
            if summary.get(key) is not None:
                gauge.set(float(summary[key]), tags=self.tags)


class Tracker:
    """The progress summary of one run (rank 0), updated by `report`."""

    def __init__(self, total_steps: int, start_step: int, run: str, publisher: Publisher | None = None,
                 gauges: _Gauges | None = None):
        self.summary: dict = dict.fromkeys(FIELDS)
        self.summary["total_steps"] = total_steps
        self.start_step, self.start_time = start_step, time.monotonic()
        self.window_rate: float | None = None
        self.publisher, self.gauges, self.run = publisher, gauges, run

    def update(self, kind: str, m: dict) -> dict:
        s = self.summary
        step = int(m.get("step", s["step"] or 0))
        s["step"] = step
        total = s["total_steps"] or 0
        s["percent"] = round(100.0 * step / total, 1) if total else None
        if kind == "train":
            s["epoch"] = round(float(m["epoch"]), 3) if m.get("epoch") is not None else s["epoch"]
            s["loss"] = round(float(m["loss"]), 4) if m.get("loss") is not None else s["loss"]
            if m.get("tokens_per_s") is not None:
                s["tokens_per_s"] = round(float(m["tokens_per_s"]), 1)
        elif kind == "eval":
            s["val_loss"] = round(float(m["val_loss"]), 4)
        elif kind == "checkpoint":
            s["last_checkpoint"] = m.get("checkpoint")
        if kind == "train" and m.get("step_time_s"):
            self.window_rate = float(m["step_time_s"])  # training seconds per step in the last logging window
        done = step - self.start_step  # steps since the first report of this process (a resume starts over)
        rate = (time.monotonic() - self.start_time) / done if done > 0 else self.window_rate
        if rate is not None and total:  # wall seconds per step, validation and saves included once known
            s["eta_seconds"] = int(round(max(total - step, 0) * rate))
        s["updated_at"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        if self.publisher is not None:
            self.publisher.submit(s)
        if self.gauges is not None:
            try:
                self.gauges.set(s)
            except Exception as e:  # noqa: BLE001
                _warn(f"Ray metrics: {e!r}; gauges turned off")
                self.gauges = None
        return dict(s)

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()


def _tracker(recipe) -> Tracker:
    tracker = getattr(recipe, "_progress_tracker", None)
    if tracker is None:
        run = recipe.cfg.checkpoint.run_name
        target = Target.from_env()
        gauges = None
        ray = sys.modules.get("ray")  # a run without Ray (bench, tests) never imports it
        try:
            if ray is not None and ray.is_initialized():
                gauges = _Gauges(run)
        except Exception as e:  # noqa: BLE001 - gauges are optional
            _warn(f"Ray metrics: cannot create the dolly_train_* gauges: {e!r}")
        tracker = Tracker(recipe.total_steps, recipe.progress.global_step, run,
                          Publisher(target) if target is not None else None, gauges)
        recipe._progress_tracker = tracker
    return tracker


def report(recipe, kind: str, metrics: dict) -> None:
    """Hook for trainer/recipe.py (rank 0 only; a no-op elsewhere): `kind` is "train", "eval" or "checkpoint",
    `metrics` what the recipe logs for it. Never raises."""
    if not getattr(recipe, "is_main", False):
        return
    try:
        _tracker(recipe).update(kind, metrics)
    except Exception as e:  # noqa: BLE001 - progress reporting must never end a training run
        _warn(f"progress summary failed: {e!r}")


def close(recipe) -> None:
    """Hook for the recipe's cleanup: send the last summary (bounded wait)."""
    tracker = getattr(recipe, "_progress_tracker", None)
    if tracker is not None:
        tracker.close()


# ---- reading it back (dolly-train status / wait, tests) -------------------------------------------------------

def from_object(obj: dict) -> dict | None:
    """The progress summary in a RayJob object, or None when absent or unreadable."""
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def age_seconds(summary: dict, now: datetime | None = None) -> float | None:
    try:
        t = datetime.strptime(summary.get("updated_at") or "", "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return ((now or datetime.now(timezone.utc)) - t).total_seconds()


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m} min"


def line(summary: dict) -> str:
    """'step 370/1,200 (31%), ETA 42 min, loss 1.21, 8,300 tokens/s' (the Argo CD message's wording)."""
    step, total = summary.get("step"), summary.get("total_steps")
    parts = [f"step {step:,}/{total:,}" if isinstance(total, int) and isinstance(step, int) else f"step {step}"]
    if summary.get("percent") is not None:
        parts[0] += f" ({summary['percent']:.0f}%)"
    if summary.get("eta_seconds") is not None:
        parts.append(f"ETA {duration(summary['eta_seconds'])}")
    if summary.get("loss") is not None:
        parts.append(f"loss {summary['loss']:.2f}")
    if summary.get("tokens_per_s") is not None:
        parts.append(f"{summary['tokens_per_s']:,.0f} tokens/s")
    return ", ".join(parts)
