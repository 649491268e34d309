"""The run dir on object storage (`checkpoint.storage_path: s3://...` or `gs://...`).

On a shared filesystem every file of the run dir is written in place. On object storage Ray Train uploads the
checkpoints itself; everything else the run writes (`metrics.jsonl`, `tensorboard/`, `logs/`, `config.yaml`,
`config_history.jsonl`, `export/`) is written into a local scratch dir and copied up with these helpers, the
same way Ray reaches the bucket: `pyarrow.fs.FileSystem.from_uri` (endpoint and credentials from the
environment: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` or `AWS_SHARED_CREDENTIALS_FILE`,
`GOOGLE_APPLICATION_CREDENTIALS`; never from the Ray runtime env, see trainer/launch.py).

An object is replaced whole by an upload (no appends on object storage), so an appended file is downloaded,
appended to and uploaded again (`metrics.jsonl` on resume, `config_history.jsonl`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from trainer.log import get_logger

log = get_logger(__name__)


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def upload_file(local: str | Path, uri: str) -> None:
    """Copy one local file to `uri` (an object is written whole: readers never see half of it)."""
    fs, path = _fs(uri)
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def upload_dir(local: str | Path, uri: str) -> None:
    """Copy every file under `local` to the same relative path under `uri` (files already there are replaced,
    others are left alone)."""
    import pyarrow.fs

    fs, path = _fs(uri)
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)


def download_file(uri: str, local: str | Path) -> bool:
    """Copy `uri` to `local`; False (and nothing written) when there is no such object."""
    import pyarrow.fs

    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return False
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(path) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return True


def scratch_dir(prefix: str) -> Path:
    """A fresh local folder for files bound for object storage (the caller removes it)."""
    return Path(tempfile.mkdtemp(prefix=f"dolly-{prefix}-"))


def record_config(run_uri: str, cfg_dict: dict) -> None:
    """`checkpointing.record_config` for a run dir on object storage: the previous `config.yaml` and
    `config_history.jsonl` come down, the new entry (with the keys changed since the previous config) is
    appended, both go back up."""
    from trainer import checkpointing

    tmp = scratch_dir("config")
    try:
        previous = tmp / "previous.yaml"
        changes = []
        if download_file(f"{run_uri}/config.yaml", previous):
            import yaml

            changes = checkpointing.changed_keys(yaml.safe_load(previous.read_text()) or {}, cfg_dict)
        run = tmp / "run"
        download_file(f"{run_uri}/config_history.jsonl", run / "config_history.jsonl")
        checkpointing.record_config(run, cfg_dict, changes)
        upload_file(run / "config_history.jsonl", f"{run_uri}/config_history.jsonl")
        upload_file(run / "config.yaml", f"{run_uri}/config.yaml")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
