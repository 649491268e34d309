"""Everything `dolly-eval run` checks before it starts vLLM: the model folder, its tokenizer and the test split.

A bad input costs an engine start (seconds on a CPU, a minute on a GPU) when found late, so every check here
is cheap and runs first; each error names the file, line, field and value.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from evaluator.config import EvalInputError
from trainer.data.prepare import sha256_file  # the digest prepare writes into the manifest
from trainer.prompt import PromptEncoder, find_tokenizer_model

REQUIRED_FIELDS = {"id": str, "category": str, "instruction": str, "context": str, "response": str}
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


@dataclass
class ModelInfo:
    path: Path
    vocab_size: int
    max_position_embeddings: int | None
    weight_files: dict[str, str]  # name -> sha256 (empty until `hash_weights` ran)
    weights_sha256: str  # sha256 over the sorted "name sha256" lines: one id for a sharded checkpoint
    tokenizer_file: str
    tokenizer_sha256: str
    weight_paths: tuple = ()

    def hash_weights(self) -> float:
        """Fill in the weight hashes; returns the seconds it took. Runs in a thread beside the engine start
        (`dolly-eval run`): hashlib releases the GIL, and the files are read again by vLLM anyway."""
        t0 = time.perf_counter()
        # one thread per shard (a 7B checkpoint has 3): sha256 runs at ~1-2 GB/s per core
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(self.weight_paths)))) as pool:
            digests = list(pool.map(sha256_file, self.weight_paths))
        self.weight_files = {p.name: h for p, h in zip(self.weight_paths, digests)}
        self.weights_sha256 = combined_sha256(self.weight_files)
        return time.perf_counter() - t0

    def record(self) -> dict:
        return {"path": str(self.path), "vocab_size": self.vocab_size, "weights_sha256": self.weights_sha256,
                "weight_files": self.weight_files, "tokenizer_file": self.tokenizer_file,
                "tokenizer_sha256": self.tokenizer_sha256}


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise EvalInputError(f"{path}: missing ({what})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise EvalInputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted({p for pat in WEIGHT_PATTERNS for p in model_dir.glob(pat)})
    if not files:
        raise EvalInputError(f"{model_dir}: no weights (model.safetensors, a safetensors index or pytorch_model.bin)")
    for index in (p for p in files if p.name.endswith(".index.json")):
        shards = set(_read_json(index, "weight index").get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (model_dir / s).is_file())
        if missing:
            raise EvalInputError(f"{index}: weight_map names missing shard(s) {missing}")
    return files


def combined_sha256(hashes: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{n} {h}\n" for n, h in sorted(hashes.items())).encode()).hexdigest()


def check_model(model_dir: str | Path, hash_weights: bool = True) -> tuple[ModelInfo, PromptEncoder]:
    """Cheap checks of the model folder; the weight hashes too unless `hash_weights` is False (then the
    caller runs `ModelInfo.hash_weights` later, e.g. beside the engine start)."""
    d = Path(model_dir).resolve()
    if not d.is_dir():
        raise EvalInputError(f"--model {model_dir}: no such directory")
    config = _read_json(d / "config.json", "a Hugging Face model folder needs config.json")
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int):
        raise EvalInputError(f"{d / 'config.json'}: vocab_size missing or not an integer ({vocab!r})")
    try:
        encoder = PromptEncoder(d)
    except (FileNotFoundError, ValueError) as e:
        raise EvalInputError(str(e)) from e
    if encoder.vocab_size != vocab:
        raise EvalInputError(
            f"{encoder.model_file}: tokenizer has {encoder.vocab_size} pieces but {d / 'config.json'} "
            f"vocab_size is {vocab}: this tokenizer does not belong to this model")
    files = _weight_files(d)
    tok = find_tokenizer_model(d)
    info = ModelInfo(d, vocab, config.get("max_position_embeddings"), {}, "", tok.name, sha256_file(tok), tuple(files))
    if hash_weights:
        info.hash_weights()
    return info, encoder


@dataclass
class TestSplit:
    path: Path
    sha256: str
    manifest: dict
    records: list[dict]

    def record(self) -> dict:
        tok = self.manifest.get("tokenizer") or {}
        return {"path": str(self.path.parent), "test_file": self.path.name, "test_sha256": self.sha256,
                "num_records": len(self.records), "manifest_source": self.manifest.get("source"),
                "manifest_tokenizer_sha256": tok.get("sha256") if isinstance(tok, dict) else None,
                # prepare's training length cap and how many test records exceed it (kept: split before the cap)
                "manifest_max_length": self.manifest.get("max_length"),
                "manifest_test_longer_than_max_length": self.manifest.get("test_longer_than_max_length")}


def _check_record(path: Path, lineno: int, obj) -> dict:
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise EvalInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name, typ in REQUIRED_FIELDS.items():
        if name not in obj:
            raise EvalInputError(f"{where}: field {name!r} is missing")
        if not isinstance(obj[name], typ):
            raise EvalInputError(f"{where}: field {name!r} must be a string, got {obj[name]!r}")
    for name in ("id", "category", "instruction", "response"):
        if not obj[name].strip():
            raise EvalInputError(f"{where}: field {name!r} is empty")
    return obj


def read_test_split(data_dir: str | Path) -> TestSplit:
    d = Path(data_dir).resolve()
    if not d.is_dir():
        raise EvalInputError(f"--data {data_dir}: no such directory")
    manifest = _read_json(d / "manifest.json", "written by `dolly-train prepare`")
    test = (manifest.get("splits") or {}).get("test") if isinstance(manifest.get("splits"), dict) else None
    if not isinstance(test, dict) or not isinstance(test.get("sha256"), str):
        raise EvalInputError(f"{d / 'manifest.json'}: splits.test.sha256 missing (see docs/CONTRACTS.md)")
    path = d / test.get("file", "test.jsonl")
    if not path.is_file():
        raise EvalInputError(f"{path}: missing (the test split named by {d / 'manifest.json'})")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != test["sha256"]:
        raise EvalInputError(f"{path}: sha256 {digest} does not match manifest.json splits.test.sha256 "
                             f"{test['sha256']} (the split changed after `dolly-train prepare`)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalInputError(f"{path}: not UTF-8 (byte {e.start}: {e.reason})") from e
    records, seen = [], {}
    # split on "\n" only: str.splitlines() also breaks at U+2028, U+0085 and other characters that JSON
    # strings carry unescaped (ensure_ascii=False), which would cut a record in two
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last record
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            raise EvalInputError(f"{path}:{lineno}: empty line")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalInputError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
        rec = _check_record(path, lineno, obj)
        if rec["id"] in seen:
            raise EvalInputError(f"{path}:{lineno}: duplicate id {rec['id']!r} (first on line {seen[rec['id']]})")
        seen[rec["id"]] = lineno
        records.append(rec)
    if not records:
        raise EvalInputError(f"{path}: empty test split (no records)")
    return TestSplit(path, digest, manifest, records)


def fit_prompts(records: list[dict], encoder: PromptEncoder, max_model_len: int | None, max_new_tokens: int,
                path: Path) -> tuple[list[list[int]], list[dict]]:
    """Prompt ids for every record, each leaving room for `max_new_tokens` within `max_model_len`.

    A prompt that does not fit keeps its whole instruction and loses the end of its context passage (the
    longest prefix, in characters, whose prompt fits): the test split keeps every record, whatever the
    training length cap was, and each truncation is counted in metrics.json. A record whose instruction
    alone does not fit is an error naming it (raise --max-model-len or lower --max-new-tokens).
    Returns (prompt ids, [{id, line, prompt_tokens, kept_tokens, context_chars, kept_context_chars}])."""
    prompt_ids = encoder.encode_prompts(records)
    if max_model_len is None:
        return prompt_ids, []
    budget = max_model_len - max_new_tokens
    truncated = []
    for lineno, (rec, ids) in enumerate(zip(records, prompt_ids), start=1):
        if len(ids) <= budget:
            continue
        context = rec["context"].strip()
        bare = encoder.encode_prompt(rec["instruction"], "")
        if not context or len(bare) > budget:
            raise EvalInputError(
                f"{path}:{lineno}: id {rec['id']!r} has a {len(ids)}-token prompt ({len(bare)} without its context); "
                f"max_model_len {max_model_len} - max_new_tokens {max_new_tokens} leaves {budget} "
                f"(raise --max-model-len or lower --max-new-tokens)")
        lo, hi = 0, len(context)  # the longest context prefix whose prompt fits: lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if len(encoder.encode_prompt(rec["instruction"], context[:mid])) <= budget:
                lo = mid
            else:
                hi = mid
        prompt_ids[lineno - 1] = encoder.encode_prompt(rec["instruction"], context[:lo])
        truncated.append({"id": rec["id"], "line": lineno, "prompt_tokens": len(ids),
                          "kept_tokens": len(prompt_ids[lineno - 1]), "context_chars": len(context),
                          "kept_context_chars": lo})
    return prompt_ids, truncated
