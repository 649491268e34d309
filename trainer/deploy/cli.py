"""`dolly-train submit | status | wait | logs | suspend | resume | delete`: RayJobs (ray.io/v1) on Kubernetes.

    helm template dolly-train charts/dolly-train -f my-values.yaml > rendered.yaml
    dolly-train submit --file rendered.yaml -n dolly-train          # the RayJob out of a multi-doc file
    dolly-train submit --config cpu-tiny --image ghcr.io/dolly-train/cpu:0.1.0 --name tiny --pvc dolly-train-data \\
        model.path=/mnt/dolly/models/tiny data.path=/mnt/dolly/data/synthetic checkpoint.storage_path=/mnt/dolly/runs
        # renders charts/dolly-train (`helm template`) with values from the config and flags: the chart's RayJob
    dolly-train status tiny -n dolly-train                         # phase + progress (step, %, ETA, loss, tokens/s);
                                                                    # outcome queued: waiting for Kueue's admission
    dolly-train wait tiny -n dolly-train --timeout 3600             # progress lines while it waits; exit 0 SUCCEEDED, 1 failed, 124 timeout,
                                                                    # 69 cannot reach / authenticate to the API
    dolly-train logs tiny -n dolly-train --follow                   # the submitter pod (`ray job submit` output)
    dolly-train suspend|resume|delete tiny -n dolly-train

The client is trainer/deploy/client.py, the RayJob builder trainer/deploy/rayjob.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from trainer import config as config_mod
from trainer import progress as progress_mod
from trainer.config import ConfigError
from trainer.deploy import rayjob as build
from trainer.deploy.client import REQUEST_TIMEOUT, K8sError, RayJobClient, WatchExpired, api_client
from trainer.deploy.state import RayJobState

# `dolly-train wait` exit codes (also in its --help).
EXIT_SUCCEEDED = 0
EXIT_FAILED = 1  # KubeRay reports the RayJob failed
EXIT_TIMEOUT = 124  # like coreutils `timeout`
EXIT_API = 69  # sysexits EX_UNAVAILABLE: no credentials, rejected credentials, API server unreachable, no such RayJob


def _client(args) -> RayJobClient:
    return RayJobClient(args.namespace, api_client(args.kubeconfig, args.context))


def cmd_submit(args) -> int:
    if bool(args.file) == bool(args.config):
        raise K8sError("submit: give either --file (a RayJob YAML) or --config with --image")
    if args.file:
        body, others = build.rayjob_from_file(Path(args.file), args.name)
        if args.overrides:
            raise K8sError(f"submit --file: key=value overrides ({args.overrides[0]}) only apply to --config")
        if others:
            print(f"note: submitting only the RayJob; not applied: {', '.join(others)}", file=sys.stderr)
        body.setdefault("metadata", {}).pop("namespace", None)  # --namespace decides
        return _print_created(_client(args).create(body))
    if not args.image or not args.name:
        raise K8sError("submit --config: --image and --name are required")
    name = build.check_name(args.name)
    cfg = config_mod.load(args.config, args.overrides)
    build.check_pod_paths(cfg)
    if not args.pvc:
        raise K8sError("submit --config: --pvc is required: the chart mounts a shared PersistentVolumeClaim at "
                       "--mount-path in every pod (e.g. the chart's <release>-data, or manifests/argocd/storage/pvc.yaml)")
    values = build.chart_values(name, cfg, args.image, pvc=args.pvc, mount_path=args.mount_path,
                          worker_memory=args.worker_memory)
    rayjob, others = build.submit_objects(build.render_chart(name, args.namespace, values, args.values or [], Path(args.chart)),
                                    Path(args.chart))
    if args.dry_run:
        build.dump_manifests([*others, rayjob], sys.stdout)
        return 0
    client = _client(args)
    created_others = []
    try:
        for obj in others:
            client.create_object(obj)
            created_others.append(obj)
        created = client.create(rayjob)
    except K8sError:
        for obj in reversed(created_others):  # nothing owns them yet: do not leave them behind
            client.delete_object(obj)
        raise
    for obj in others:
        client.own(obj, created)
    return _print_created(created)


def _print_created(obj: dict) -> int:
    meta = obj["metadata"]
    print(f"rayjob.ray.io/{meta['name']} created in namespace {meta.get('namespace', '?')}")
    return 0


def cmd_status(args) -> int:
    client = _client(args)
    obj = client.get(args.name)
    s = RayJobState.from_object(obj)
    prog = progress_mod.from_object(obj)
    age = progress_mod.age_seconds(prog) if prog else None
    if args.output == "json":
        # KubeRay's status as it is, plus the outcome and the trainer's progress annotation (null when absent).
        out = {**(obj.get("status") or {}), "outcome": s.outcome,
               "progress": {**prog, "age_seconds": None if age is None else round(age)} if prog else None}
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    rows = [("rayjob", f"{args.namespace}/{s.name}"), ("job status", s.job_status or "-"),
            ("deployment", s.deployment_status or "New"), ("reason", s.reason or "-"),
            ("message", s.message or "-"), ("ray cluster", s.cluster or "-"), ("suspend", str(s.suspend).lower()),
            ("kueue queue", s.queue or "-"),
            ("failed attempts", str(s.failed)), ("started", s.start_time or "-"), ("ended", s.end_time or "-"),
            ("outcome", s.outcome)]
    rows += _progress_rows(prog, age)
    for key, value in rows:
        print(f"{key:<16} {value}")
    return 0


def _progress_rows(prog: dict | None, age: float | None) -> list[tuple[str, str]]:
    """Table rows of the trainer's progress annotation (trainer/progress.py)."""
    if not prog:
        return [("progress", f"- (no {progress_mod.ANNOTATION} annotation yet)")]

    def fmt(key, spec):
        v = prog.get(key)
        return "-" if v is None else format(v, spec)

    step, total = prog.get("step"), prog.get("total_steps")
    pct = prog.get("percent")
    return [("step", f"{step if step is not None else '-'}/{total if total is not None else '-'}"
                     + (f" ({pct:.1f}%)" if pct is not None else "")),
            ("epoch", fmt("epoch", ".2f")),
            ("eta", progress_mod.duration(prog.get("eta_seconds"))),
            ("loss", fmt("loss", ".4f")), ("val loss", fmt("val_loss", ".4f")),
            ("tokens/s", fmt("tokens_per_s", ",.0f")),
            ("last checkpoint", prog.get("last_checkpoint") or "-"),
            ("updated", f"{progress_mod.duration(age)} ago ({prog.get('updated_at')})" if age is not None else "-")]


def wait_for(client: RayJobClient, name: str, timeout: float, poll: float, out=None) -> int:
    """Follow the RayJob until it succeeds (0) or fails (1), or `timeout` seconds pass (124); exit 69 when the API
    server cannot be reached (retried with backoff until the deadline) or refuses the credentials or the name.

    Each round reads the object (GET) and then watches it from that resourceVersion; a watch that ends, drops its
    connection or expires (410) is resumed by the next round, so no change is missed and none is waited for
    longer than `poll` seconds past a quiet watch. Every call carries a request timeout bounded by the deadline."""
    out = out or sys.stdout
    start = time.monotonic()
    deadline = start + timeout
    last, state, api_error, delay = None, None, None, min(max(poll, 0.05), 1.0)
    last_progress = None

    def report(obj: dict) -> int | None:
        nonlocal last, state, last_progress
        state = RayJobState.from_object(obj)
        if state.summary() != last:
            last = state.summary()
            print(f"[{time.monotonic() - start:7.1f}s] {name}: {last}", file=out, flush=True)
        prog = progress_mod.from_object(obj)
        if prog and prog.get("updated_at") != last_progress:  # the trainer's annotation (trainer/progress.py)
            last_progress = prog.get("updated_at")
            print(f"[{time.monotonic() - start:7.1f}s] {name}: progress {progress_mod.line(prog)}", file=out, flush=True)
        if state.outcome == "succeeded":
            print(f"{name}: SUCCEEDED", file=out, flush=True)
            return EXIT_SUCCEEDED
        if state.outcome == "failed":
            print(f"{name}: FAILED - {state.summary()}", file=sys.stderr, flush=True)
            return EXIT_FAILED
        return None

    while True:
        remaining, in_watch = deadline - time.monotonic(), False
        try:
            obj = client.get(name, timeout=min(REQUEST_TIMEOUT, max(remaining, 0.1)))
            api_error, delay = None, min(max(poll, 0.05), 1.0)
            verdict = report(obj)
            if verdict is not None:
                return verdict
            rv = (obj.get("metadata") or {}).get("resourceVersion") or "0"
            remaining = deadline - time.monotonic()
            if remaining > 0:
                in_watch = True
                for obj in client.watch(name, rv, seconds=min(max(poll, 1.0), remaining + 1),
                                        timeout=min(max(poll, 1.0) + 5.0, remaining + 1.0)):
                    verdict = report(obj)
                    if verdict is not None:
                        return verdict
                    if time.monotonic() >= deadline:
                        break
        except WatchExpired:
            continue  # read the object again, watch from its new resourceVersion
        except K8sError as e:
            if not e.transient:
                print(f"dolly-train wait: {e}", file=sys.stderr, flush=True)
                return EXIT_API
            if not (in_watch and time.monotonic() >= deadline):  # a watch read cut short by our own deadline is no error
                api_error = e
                pause = min(delay, max(deadline - time.monotonic(), 0))
                print(f"[{time.monotonic() - start:7.1f}s] {name}: API error, retrying in {pause:.1f} s: {e}",
                      file=sys.stderr, flush=True)
                time.sleep(pause)
                delay = min(delay * 2, 30.0)
        if time.monotonic() >= deadline:
            if api_error is not None:
                print(f"{name}: cannot reach the API server for {timeout:g} s; last error: {api_error}",
                      file=sys.stderr, flush=True)
                return EXIT_API
            print(f"{name}: timed out after {timeout:g} s ({state.summary() if state else 'no status'})",
                  file=sys.stderr, flush=True)
            return EXIT_TIMEOUT


def cmd_wait(args) -> int:
    try:
        client = _client(args)
    except K8sError as e:  # no or unreadable credentials: not a verdict about the job
        print(f"dolly-train wait: {e}", file=sys.stderr)
        return EXIT_API
    return wait_for(client, args.name, args.timeout, args.poll)


def cmd_logs(args) -> int:
    client = _client(args)
    pods = client.submitter_pods(args.name)
    if not pods:
        state = client.state(args.name)  # also says "not found" when the RayJob itself is missing
        raise K8sError(f"RayJob {args.name} has no submitter pod yet (label job-name={args.name} in namespace "
                       f"{args.namespace}; {state.summary()})")
    for pod in pods if args.all else pods[-1:]:
        if args.all:
            print(f"==> pod {pod.metadata.name}", flush=True)
        log = client.pod_log(pod.metadata.name, args.follow and pod is pods[-1])
        if isinstance(log, str):
            sys.stdout.write(log)
        else:
            for chunk in log:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        sys.stdout.flush()
    return 0


def cmd_suspend(args) -> int:
    suspend = args.command == "suspend"
    client = _client(args)
    if not suspend:
        state = client.state(args.name)
        if state.queue:  # Kueue owns spec.suspend: it would suspend the job again at once, or run it over quota
            raise K8sError(f"resume: RayJob {args.name} is managed by Kueue (LocalQueue {state.queue}); Kueue "
                           "un-suspends it when the queue admits it (`kubectl get workloads -n "
                           f"{args.namespace}` shows why it waits)")
    obj = client.set_suspend(args.name, suspend)
    print(f"rayjob.ray.io/{args.name} {'suspended' if suspend else 'resumed'} "
          f"(spec.suspend={str(bool(obj.get('spec', {}).get('suspend'))).lower()})")
    return 0


def cmd_delete(args) -> int:
    _client(args).delete(args.name)
    print(f"rayjob.ray.io/{args.name} deleted from namespace {args.namespace}")
    return 0


def _guard(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except (K8sError, ConfigError) as e:
            print(f"dolly-train {args.command}: {e}", file=sys.stderr)
            return 1 if isinstance(e, K8sError) else 2
    return run


# ---- argparse -----------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, name: bool = True) -> None:
    if name:
        p.add_argument("name", help="RayJob name")
    p.add_argument("-n", "--namespace", default="default", help="namespace of the RayJob (default: %(default)s)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, else in-cluster)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")


def add_parser(sub) -> None:
    fmt = argparse.HelpFormatter
    p = sub.add_parser("submit", formatter_class=fmt, help="create a RayJob from a YAML file or a train config",
                       description="Create a RayJob: the RayJob in --file (e.g. `helm template` output), or the "
                                   "chart's RayJob for a train config (--config, a file or preset) and --image: "
                                   "`helm template` of --chart with values from the config and the flags (then "
                                   "--values files), creating the RayJob and the ConfigMap (train.yaml) and "
                                   "NetworkPolicy it renders, both owned by the RayJob.")
    _common(p, name=False)
    p.add_argument("--file", help="YAML file holding a ray.io/v1 RayJob (other documents are skipped)")
    p.add_argument("--config", help="train config file or preset (trainer/config.py schema)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with --config)")
    p.add_argument("--image", help="image for head and workers (with --config)")
    p.add_argument("--name", help="RayJob name (required with --config; picks one RayJob from --file)")
    p.add_argument("--pvc", help="existing PersistentVolumeClaim mounted at --mount-path in every pod (with --config)")
    p.add_argument("--values", action="append", metavar="FILE",
                   help="chart values file applied on top of the flags (repeatable; with --config), e.g. "
                        "charts/dolly-train/values-gpu-8x.yaml without its train section")
    p.add_argument("--chart", default=str(build.CHART), help="the dolly-train chart (default: %(default)s)")
    p.add_argument("--mount-path", default="/mnt/dolly", help="where --pvc is mounted (default: %(default)s)")
    p.add_argument("--worker-memory", default="8Gi", help="memory request and limit per worker pod (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the objects instead of creating them")
    p.set_defaults(func=_guard(cmd_submit))

    p = sub.add_parser("status", formatter_class=fmt, help="show a RayJob's status and training progress",
                       description="Print jobStatus, jobDeploymentStatus, reason and message of a RayJob, and the "
                                   "training progress rank 0 publishes in its dolly-train.dev/progress annotation "
                                   "(step, %, ETA, loss, tokens/s, last checkpoint, age of the update). "
                                   "--output json: the status fields, `outcome` and `progress` (null when absent).")
    _common(p)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format (default: %(default)s)")
    p.set_defaults(func=_guard(cmd_status))

    p = sub.add_parser("wait", formatter_class=argparse.RawDescriptionHelpFormatter, help="wait for a RayJob to finish",
                       description="Wait for a RayJob, following it with a watch (resumed after a dropped connection) "
                                   "and retrying transient API errors with backoff; prints a line per status change and "
                                   "per update of the trainer's progress annotation (step, %, ETA, loss, tokens/s).\n"
                                   "A retry (jobDeploymentStatus Retrying, within spec.backoffLimit) is not a failure.",
                       epilog="exit status:\n"
                              f"  {EXIT_SUCCEEDED:<4} the Ray job SUCCEEDED and KubeRay marked the RayJob Complete\n"
                              f"  {EXIT_FAILED:<4} the RayJob failed: deployment Failed or ValidationFailed, Complete "
                              "without SUCCEEDED,\n       or the Ray job FAILED in its last attempt\n"
                              f"  {EXIT_TIMEOUT:<4} --timeout passed while the RayJob was still running\n"
                              f"  {EXIT_API:<4} cannot reach or authenticate to the API server (no or rejected "
                              "credentials,\n       unreachable for the whole --timeout), or no such RayJob\n"
                              "  2    bad arguments")
    _common(p)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait (default: %(default)s)")
    p.add_argument("--poll", type=float, default=10.0,
                   help="longest quiet watch before the status is read again (default: %(default)s)")
    p.set_defaults(func=_guard(cmd_wait))

    p = sub.add_parser("logs", formatter_class=fmt, help="print the submitter pod's logs",
                       description="Print the logs of the RayJob's submitter pod (the Kubernetes Job KubeRay "
                                   "names after the RayJob; label job-name), which follows the Ray job's output.")
    _common(p)
    p.add_argument("-f", "--follow", action="store_true", help="stream the newest pod's log until it ends")
    p.add_argument("--all", action="store_true", help="every submitter pod (retries), oldest first")
    p.set_defaults(func=_guard(cmd_logs))

    for verb, text in (("suspend", "suspend a RayJob (KubeRay deletes its RayCluster)"),
                       ("resume", "resume a suspended RayJob (KubeRay creates a new RayCluster)")):
        p = sub.add_parser(verb, formatter_class=fmt, help=text, description=text + " by patching spec.suspend.")
        _common(p)
        p.set_defaults(func=_guard(cmd_suspend))

    p = sub.add_parser("delete", formatter_class=fmt, help="delete a RayJob with its cluster and submitter",
                       description="Delete a RayJob (foreground propagation: its RayCluster, submitter Job and "
                                   "ConfigMap go with it).")
    _common(p)
    p.set_defaults(func=_guard(cmd_delete))
