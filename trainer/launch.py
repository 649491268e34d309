"""`dolly-train train`: run the fine-tuning recipe on a Ray cluster with Ray Train's `TorchTrainer`.

    # local: starts a Ray cluster in-process (2 CPU workers, gloo, DeepSpeed ZeRO-2)
    dolly-train train --config cpu-tiny model.path=work/models/tiny data.path=work/data/synthetic
    # KubeRay: RAY_ADDRESS is set in the job's pods, so the same command joins that cluster
    dolly-train train --config /etc/dolly-train/train.yaml

Rerunning the same `checkpoint.run_name` under the same `checkpoint.storage_path` resumes from the latest
checkpoint (Ray Train restores its run snapshot); `checkpoint.max_failures` lets Ray Train restart the
worker group from the latest checkpoint after a worker dies.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import sys
import threading
import uuid
from pathlib import Path

from trainer import checkpointing, storage
from trainer import config as config_mod
from trainer.config import ConfigError, TrainConfig
from trainer.failures import FatalError, classify, root_cause, stop_on_fatal_callback
from trainer.log import get_logger
from trainer.quiet import quiet_output

log = get_logger(__name__)

# Environment the workers need to see (HF offline mode, test hooks, the object-store endpoint) when Ray starts
# them elsewhere. It travels in the workers' Ray runtime env ...
PROPAGATED_ENV_PREFIXES = ("HF_", "DOLLY_", "TRANSFORMERS_", "NCCL_", "DS_", "TOKENIZERS_", "PYTORCH_",
                           "TORCH_EXTENSIONS_", "AWS_", "GOOGLE_")
# ... which the Ray dashboard, `ray list actors --detail`, the job/actor tables in the GCS and Ray's logs show to
# anyone who can reach the cluster. So a name that looks like a credential (HF_TOKEN, RAY_AUTH_TOKEN,
# AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, AWS_SESSION_TOKEN, ...) never goes there, whatever its prefix: the
# workers read those from their own process environment (KubeRay: the pod's env, secretKeyRef / envFrom;
# the in-process local cluster: inherited from this process) or from a file whose path may travel
# (AWS_SHARED_CREDENTIALS_FILE, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN_PATH).
SECRET_ENV = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|API_?KEY|ACCESS_KEY|PRIVATE_KEY|AUTH"
                        r"|SIGNATURE)(_|$)", re.IGNORECASE)
SECRET_FILE_POINTERS = frozenset({"AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "GOOGLE_APPLICATION_CREDENTIALS",
                                  "HF_TOKEN_PATH"})


def is_secret_name(name: str) -> bool:
    """A name that looks like it holds a credential. Variables that point at a file (`..._FILE`, `..._PATH`, and
    the cloud SDKs' own names) carry a path, not the secret, and must reach the workers: e.g. the progress
    publisher's DOLLY_KUBE_TOKEN_FILE, the service-account token it reads (trainer/progress.py)."""
    if name in SECRET_FILE_POINTERS or name.upper().endswith(("_FILE", "_PATH")):
        return False
    return bool(SECRET_ENV.search(name))


def worker_env(environ) -> dict[str, str]:
    """The variables the workers' Ray runtime env carries: the propagated prefixes, no secret-looking name."""
    return {k: v for k, v in environ.items() if k.startswith(PROPAGATED_ENV_PREFIXES) and not is_secret_name(k)}

# Ray Train V2's defaults suit long multi-node runs; a variable set by the user wins (docs/benchmarks.md,
# "fixed costs", has the before/after figures).
RAY_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # controller polls workers (default 2 s): end of run, reported
                                                 # checkpoints and dead workers are seen sooner
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",         # else every metrics line is printed twice
}
# ... and for the in-process local cluster only (nothing preempts a laptop; nobody scrapes its metrics):
RAY_TRAIN_LOCAL_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one actor (a process) less on a 2-core machine
    "RAY_TRAIN_METRICS_ENABLED": "0",
}
# Ray settings of the in-process local cluster (docs/benchmarks.md, "fixed costs"):
LOCAL_RAY_SYSTEM_CONFIG = {
    # Ray starts one idle worker per CPU for the first driver, but every process of a Ray Train run has its own
    # runtime env (env vars), so none of them is ever used: two interpreters importing Ray for nothing, while
    # the run's own processes start.
    "prestart_worker_first_driver": False,
    # The v1 autoscaler monitor outlives ray.shutdown()'s SIGTERM by its full 1 s grace period (it tries to
    # report its own termination to the GCS, stopped just before it); the v2 monitor exits at once. A local
    # cluster does not autoscale either way.
    "enable_autoscaler_v2": True,
}


class PreflightError(RuntimeError):
    """The run cannot start; raised before any worker is created."""


def is_local_model(path: str) -> bool:
    # A hub id is exactly "org/name"; anything else (absolute, ./relative, deeper paths) is a folder.
    return Path(path).is_absolute() or path.startswith(".") or Path(path).exists() or path.count("/") != 1


def absolutize(cfg: TrainConfig) -> None:
    """Relative paths mean relative to where the command runs; Ray workers run elsewhere (and Ray's storage
    layer needs an absolute path), so resolve them here."""
    if is_local_model(cfg.model.path):
        cfg.model.path = os.path.abspath(cfg.model.path)
    cfg.data.path = os.path.abspath(cfg.data.path)
    if not cfg.is_remote_storage:
        cfg.checkpoint.storage_path = os.path.abspath(cfg.checkpoint.storage_path)


def preflight(cfg: TrainConfig) -> None:
    model = Path(cfg.model.path)
    looks_local = is_local_model(cfg.model.path)
    if looks_local and not (model / "config.json").is_file():
        raise PreflightError(f"model.path: {cfg.model.path} is not a Hugging Face model folder (no config.json)")
    if not looks_local and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise PreflightError(f"model.path: {cfg.model.path!r} is a hub id but HF_HUB_OFFLINE=1; pass a local folder")
    data = Path(cfg.data.path)
    for split in ("train", "validation"):
        if not (data / "tokenized" / split).is_dir():
            raise PreflightError(
                f"data.path: {data / 'tokenized' / split} is missing; run `dolly-train prepare --out {data}` first")
    manifest = data / "manifest.json"
    if manifest.is_file():
        import json

        prepared = json.loads(manifest.read_text()).get("max_length")
        if prepared and prepared > cfg.data.max_length:
            raise PreflightError(
                f"data.max_length: {cfg.data.max_length} is below the length the data was prepared for "
                f"({prepared}, {manifest}); examples could not fit a row")
    if not cfg.is_remote_storage:
        run_dir = Path(cfg.run_dir())
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-probe-{uuid.uuid4().hex}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise PreflightError(f"checkpoint.storage_path: cannot write to {run_dir}: {e}") from e
        check_resume_config(cfg)

    if cfg.lora.enabled:  # LoRA: the target modules exist in the model (meta device, no weights)
        from trainer import lora

        try:
            lora.check_target_modules(cfg)
        except ConfigError as e:
            raise PreflightError(str(e)) from e

    from trainer import ds_ops

    try:
        ds_ops.preflight(cfg)
    except ds_ops.StaleLockError as e:
        raise PreflightError(str(e)) from e


def check_resume_config(cfg: TrainConfig) -> list:
    """Rerunning a run resumes it: refuse (before any worker starts) when the config changed a key that would
    reinterpret the saved position; return the safe changes. The workers check again against the checkpoint
    they load (object storage included)."""
    ckpt = checkpointing.latest_valid(checkpointing.checkpoints(Path(cfg.run_dir())), warn=lambda _m: None)
    if ckpt is None or not (ckpt / "config.yaml").is_file():
        return []
    try:
        return checkpointing.check_resume(ckpt / "config.yaml", cfg.to_dict(), cfg.checkpoint.run_name)
    except FatalError as e:
        raise PreflightError(str(e)) from e


def check_cluster_resources(cfg: TrainConfig) -> None:
    import ray

    res = ray.cluster_resources()
    s = cfg.scaling
    if s.use_gpu and res.get("GPU", 0) < s.num_workers:
        raise PreflightError(
            f"scaling.use_gpu: the config asks for {s.num_workers} GPU workers but the Ray cluster has "
            f"{int(res.get('GPU', 0))} GPUs; set scaling.use_gpu=false (CPU workers) or lower scaling.num_workers")
    need_cpu = s.num_workers * s.cpus_per_worker
    if res.get("CPU", 0) < need_cpu and not os.environ.get("RAY_ADDRESS"):
        raise PreflightError(
            f"scaling: {s.num_workers} workers x {s.cpus_per_worker} CPUs need {need_cpu} CPUs; "
            f"this machine's Ray cluster has {int(res.get('CPU', 0))}")


def train_loop_per_worker(config_dict: dict) -> None:
    """Runs in every Ray Train worker."""
    import torch

    from trainer.contexts import RayContext
    from trainer.recipe import FullFinetuneRecipe

    cfg = config_mod.from_dict(config_dict)
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(cfg.scaling.cpus_per_worker)
    ctx = RayContext(cfg)
    pid_dir = os.environ.get("DOLLY_PID_DIR")  # lets the fault-tolerance test kill a real worker process
    if pid_dir:
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"rank{ctx.rank}.pid").write_text(str(os.getpid()))
        with open(Path(pid_dir) / "starts.log", "a") as fh:  # one line per worker start: restarts are visible
            fh.write(f"rank{ctx.rank} {os.getpid()}\n")
    recipe = FullFinetuneRecipe(cfg, ctx)
    scratch = None
    try:
        recipe.setup()
        ctx.release_checkpoint()  # resumed: a checkpoint downloaded from object storage is no longer needed
        recipe.train()
        if cfg.checkpoint.export:
            if cfg.is_remote_storage:  # written locally, then uploaded
                scratch = storage.scratch_dir("export")
                export_dir = scratch / "export"
            else:
                export_dir = Path(cfg.run_dir()) / "export"
            out = recipe.export(export_dir)
            if out is not None and cfg.is_remote_storage:
                storage.upload_dir(out, f"{cfg.run_dir()}/export")
                if cfg.lora.enabled:  # LoRA: the PEFT adapter folder beside the merged export
                    from trainer.lora import adapter_dir_for

                    storage.upload_dir(adapter_dir_for(out), f"{cfg.run_dir()}/export-adapter")
            if out is not None:
                log.info(f"exported Hugging Face model to {cfg.run_dir()}/export")
    except Exception as e:
        # A failure a restart would repeat (OOM at the same step, config error, missing file, import error,
        # watchdog timeout) becomes a FatalError: StopOnFatalError ends the run instead of retrying it.
        fatal = classify(e)
        if fatal is not None and fatal is not e:
            raise fatal from e
        raise
    finally:
        recipe.cleanup()
        ctx.release_checkpoint()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def run_training(cfg: TrainConfig) -> object:
    absolutize(cfg)
    preflight(cfg)  # before Ray is imported: a wrong path is refused at once
    import ray

    local = not (ray.is_initialized() or os.environ.get("RAY_ADDRESS"))
    for key, value in {**RAY_TRAIN_ENV, **(RAY_TRAIN_LOCAL_ENV if local else {})}.items():
        os.environ.setdefault(key, value)  # read by TorchTrainer, which passes them on to controller and workers
    if not ray.is_initialized():
        # Ray Train imports torch, pandas and Ray Data (~1.5 s of CPU): done while ray.init waits for its
        # processes to come up, which leaves the driver idle for seconds.
        importer = threading.Thread(target=importlib.import_module, args=("ray.train.torch",),
                                    name="dolly-import-ray-train", daemon=True)
        importer.start()
        if local:
            ray.init(num_cpus=max(os.cpu_count() or 1, cfg.scaling.num_workers * cfg.scaling.cpus_per_worker),
                     include_dashboard=False, log_to_driver=True, _system_config=LOCAL_RAY_SYSTEM_CONFIG)
        else:
            ray.init()
        importer.join()
    check_cluster_resources(cfg)
    if not cfg.is_remote_storage:  # <run>/config.yaml + config_history.jsonl (checked by preflight)
        checkpointing.record_config(Path(cfg.run_dir()), cfg.to_dict(), check_resume_config(cfg))
    else:  # the same two files, kept in the bucket (the workers check the resume against the checkpoint)
        try:
            storage.record_config(cfg.run_dir(), cfg.to_dict())
        except OSError as e:
            raise PreflightError(f"checkpoint.storage_path: cannot write to {cfg.run_dir()}: {e}") from e
    return make_trainer(cfg).fit()


def make_trainer(cfg: TrainConfig):
    """The run's `TorchTrainer` (Ray need not be initialized yet; `fit()` starts the run)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    withheld = sorted(k for k in os.environ if k.startswith(PROPAGATED_ENV_PREFIXES) and is_secret_name(k))
    if withheld:  # names only; the workers read the values from their own environment (see SECRET_ENV)
        log.info(f"not passed through Ray's runtime env (secrets): {', '.join(withheld)}")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        # The process group's timeout (NCCL or gloo; init and every collective): explicit, from the config.
        torch_config=TorchConfig(timeout_s=cfg.watchdog.collective_s),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=cfg.checkpoint.run_name,
            storage_path=cfg.checkpoint.storage_path,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            callbacks=[stop_on_fatal_callback()],  # a FatalError from a worker is not retried
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            worker_runtime_env={"env_vars": worker_env(os.environ)},
        ),
    )


# ---- CLI --------------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune with Ray Train + DeepSpeed (resumes a run of the same name)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=False, help=f"YAML file or preset name ({', '.join(config_mod.PRESETS)})")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values, e.g. optim.lr=2e-5")
    p.add_argument("--help-config", action="store_true", help="list every config key with its help text and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--verbose", action="store_true",
                   help="print Ray's and DeepSpeed's output too (default: only dolly-train's lines; the rest goes "
                        "to <run>/logs/, whose path is printed)")
    p.set_defaults(func=run_train)

    r = sub.add_parser(
        "render-deepspeed",
        help="write the DeepSpeed JSON of a config (the files in trainer/configs/deepspeed/)",
        description="Render the DeepSpeed JSON for a config; with --check, fail when the committed file differs.",
    )
    r.add_argument("--config", required=True, help="YAML file or preset name")
    r.add_argument("--out", help="output file (default: stdout)")
    r.add_argument("--check", action="store_true", help="exit 1 if --out differs from the rendering")
    r.set_defaults(func=run_render)


def run_train(args) -> int:
    if args.help_config:
        for key, help_text, default in config_mod.describe():
            print(f"{key:38s} {help_text} [default: {default!r}]")
        return 0
    if not args.config:
        print("dolly-train train: --config is required (a YAML file or a preset)", file=sys.stderr)
        return 2
    try:
        cfg = config_mod.load(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        if args.verbose:
            result = run_training(cfg)
        else:
            log_path = train_log_path(cfg)
            try:
                with quiet_output(log_path):
                    try:
                        result = run_training(cfg)
                    finally:
                        disconnect_ray()
            finally:
                upload_log(cfg, log_path)
    except (ConfigError, PreflightError) as e:
        print(f"dolly-train train: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # TorchTrainer.fit raises the run's error (ControllerError / WorkerGroupError)
        if type(e).__module__.startswith("ray."):
            print(f"dolly-train train: the run failed: {root_cause(e)}", file=sys.stderr)
            return 1
        raise
    if getattr(result, "error", None):
        print(f"dolly-train train: the run failed: {root_cause(result.error)}", file=sys.stderr)
        return 1
    log.info(f"done: run dir {cfg.run_dir()}")
    return 0


def upload_log(cfg: TrainConfig, log_path: Path) -> None:
    """Object storage: the run's log goes to <run>/logs/ (on a filesystem it was written there) and its local
    copy is removed; a failed upload leaves it where it is, saying so."""
    if not cfg.is_remote_storage or not log_path.is_file():
        return
    uri = f"{cfg.run_dir()}/logs/{log_path.name}"
    try:
        storage.upload_file(log_path, uri)
    except OSError as e:
        print(f"dolly-train train: could not upload the log to {uri}: {e}; it stays at {log_path}", file=sys.stderr)
        return
    log_path.unlink()
    log.info(f"log: {uri}")


def disconnect_ray() -> None:
    """Stop (a local cluster) or leave (a remote one) Ray before the terminal is given back: until then Ray's
    driver keeps printing its actors' late lines (Ray Train's "Reporting training result N", the placement-group
    cleaner's "Failed to query Ray Train Controller actor state"), which then reached the terminal after "done"."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def train_log_path(cfg: TrainConfig) -> Path:
    import tempfile
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    fallback = Path(tempfile.gettempdir()) / "dolly-train" / cfg.checkpoint.run_name / f"train-{stamp}.log"
    if cfg.is_remote_storage:
        return fallback
    logs = Path(os.path.abspath(cfg.run_dir())) / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable storage path: preflight reports it; the log goes to the temp dir
        return fallback
    return logs / f"train-{stamp}.log"


def run_render(args) -> int:
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as e:
        print(f"dolly-train render-deepspeed: {e}", file=sys.stderr)
        return 2
    text = config_mod.render_deepspeed_json(cfg)
    if args.check:
        current = Path(args.out).read_text() if args.out and Path(args.out).exists() else ""
        if current != text:
            print(f"{args.out} differs from the rendering of {args.config}", file=sys.stderr)
            return 1
        return 0
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0
