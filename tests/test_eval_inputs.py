"""`dolly-eval run` on bad input: a clear one-line error, exit status 2, nothing written, vLLM never started.

Fast: every case fails in the checks that run before the engine would start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evaluator.cli import build_parser, main
from evaluator.config import EvalInputError, from_args

RECORDS = [
    {"id": "dolly-000000000001", "category": "open_qa", "instruction": "What is the capital of France?",
     "context": "", "response": "Paris is the capital of France."},
    {"id": "dolly-000000000002", "category": "closed_qa", "instruction": "How tall is the tower?",
     "context": "The tower is 330 metres tall.", "response": "It is 330 metres tall."},
    {"id": "dolly-000000000003", "category": "brainstorming", "instruction": "Name three fruits.",
     "context": "", "response": "Apple, banana and cherry."},
]


def write_data_dir(path: Path, lines: list[str]) -> Path:
    """A prepared data dir in the docs/CONTRACTS.md format whose manifest hashes `lines` as test.jsonl."""
    path.mkdir(parents=True, exist_ok=True)
    body = "".join(line + "\n" for line in lines).encode()
    (path / "test.jsonl").write_bytes(body)
    manifest = {"schema_version": 1, "source": "jsonl", "source_path": "inline", "seed": 0, "max_length": 512,
                "tokenizer": {"file": "tokenizer.model", "sha256": "0" * 64},
                "counts": {"test": {"total": len(lines), "by_category": {}}}, "skipped": {}, "dropped_too_long": 0,
                "splits": {"test": {"file": "test.jsonl", "sha256": hashlib.sha256(body).hexdigest()}}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def good_lines() -> list[str]:
    return [json.dumps(r) for r in RECORDS]


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    return write_data_dir(tmp_path / "data", good_lines())


def run_eval(model, data, out, *extra) -> int:
    return main(["run", "--model", str(model), "--data", str(data), "--out", str(out), *extra])


def assert_fails(capsys, model, data, out, *needles, extra=()) -> str:
    assert run_eval(model, data, out, *extra) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert not Path(out).exists(), "a failed run must not create --out"
    assert not list(Path(out).parent.glob(f".{Path(out).name}.tmp-*")), "temp folder left behind"
    return err


def test_missing_model_dir(tmp_path, data_dir, capsys):
    assert_fails(capsys, tmp_path / "nope", data_dir, tmp_path / "out", "--model", "no such directory")


def test_tokenizer_vocab_mismatch(tmp_path, tiny_model_dir, data_dir, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["vocab_size"] = 32000
    (model / "config.json").write_text(json.dumps(cfg))
    assert_fails(capsys, model, data_dir, tmp_path / "out", "32768 pieces", "vocab_size is 32000",
                 "does not belong to this model")


def test_model_without_tokenizer_or_weights(tmp_path, tiny_model_dir, data_dir, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "model.safetensors").unlink()
    assert_fails(capsys, model, data_dir, tmp_path / "out", "no weights")
    (model / "tokenizer.model").unlink()
    assert_fails(capsys, model, data_dir, tmp_path / "out", "no Mistral SentencePiece model")


def test_empty_test_split(tmp_path, tiny_model_dir, capsys):
    data = write_data_dir(tmp_path / "data", [])
    assert_fails(capsys, tiny_model_dir, data, tmp_path / "out", "test.jsonl: empty test split")


def test_malformed_line_names_file_and_line(tmp_path, tiny_model_dir, capsys):
    lines = good_lines()
    lines.insert(2, '{"id": "dolly-x", "category": "open_qa", "instruction": ')
    data = write_data_dir(tmp_path / "data", lines)
    assert_fails(capsys, tiny_model_dir, data, tmp_path / "out", f"{data / 'test.jsonl'}:3: not valid JSON")


def test_missing_and_mistyped_fields(tmp_path, tiny_model_dir, capsys):
    rec = dict(RECORDS[0])
    del rec["response"]
    data = write_data_dir(tmp_path / "a", [*good_lines(), json.dumps(rec)])
    assert_fails(capsys, tiny_model_dir, data, tmp_path / "out", "test.jsonl:4: field 'response' is missing")
    rec = {**RECORDS[0], "id": "dolly-y", "context": None}
    data = write_data_dir(tmp_path / "b", [json.dumps(rec)])
    assert_fails(capsys, tiny_model_dir, data, tmp_path / "out", "test.jsonl:1: field 'context' must be a string")


def test_duplicate_ids(tmp_path, tiny_model_dir, capsys):
    data = write_data_dir(tmp_path / "data", [*good_lines(), good_lines()[1]])
    assert_fails(capsys, tiny_model_dir, data, tmp_path / "out",
                 "test.jsonl:4: duplicate id 'dolly-000000000002' (first on line 2)")


def test_split_changed_after_prepare(tmp_path, tiny_model_dir, data_dir, capsys):
    with open(data_dir / "test.jsonl", "a") as f:
        f.write(json.dumps({**RECORDS[0], "id": "dolly-extra"}) + "\n")
    assert_fails(capsys, tiny_model_dir, data_dir, tmp_path / "out", "does not match manifest.json splits.test.sha256")
    (data_dir / "manifest.json").unlink()
    assert_fails(capsys, tiny_model_dir, data_dir, tmp_path / "out", "manifest.json: missing")


def test_prompt_longer_than_max_model_len(tmp_path, tiny_model_dir, data_dir, capsys):
    assert_fails(capsys, tiny_model_dir, data_dir, tmp_path / "out", "test.jsonl:1:", "raise --max-model-len",
                 extra=("--max-model-len", "8"))


def test_out_that_would_replace_the_model_is_refused(tmp_path, tiny_model_dir, data_dir, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    assert run_eval(model, data_dir, tmp_path) == 2
    assert "would replace --model" in capsys.readouterr().err
    assert (model / "model.safetensors").is_file()


def test_failed_run_leaves_an_existing_out_untouched(tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"previous": true}')
    assert run_eval(tmp_path / "nope", data_dir, out) == 2
    assert json.loads((out / "metrics.json").read_text()) == {"previous": True}


def test_exit_status_2_and_vllm_not_imported(tmp_path, tiny_model_dir):
    """The real process: exit status 2, one clear line on stderr, and vLLM was never imported."""
    data = write_data_dir(tmp_path / "data", [*good_lines(), good_lines()[0]])
    code = ("import sys; from evaluator.cli import main; rc = main(sys.argv[1:]); "
            "assert 'vllm' not in sys.modules, 'vllm imported before the input checks'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "run", "--model", str(tiny_model_dir), "--data", str(data),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "error:" in p.stderr and "duplicate id" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


# ---- options: flags, config file, validation -------------------------------------------------------


def parse(argv):
    return from_args(build_parser().parse_args(["run", *argv]))


def test_config_file_and_flags_win(tmp_path):
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text("model: m\ndata: d\nout: o\nengine:\n  dtype: float32\n  max_model_len: 1024\n"
                        "sampling:\n  max_new_tokens: 64\n  temperature: 0.7\n  seeds: [3, 4]\n")
    cfg = parse(["--config", str(cfg_file), "--max-new-tokens", "8", "--out", "o2", "--enforce-eager"])
    assert (cfg.model, cfg.data, cfg.out) == ("m", "d", "o2")
    assert cfg.engine.dtype == "float32" and cfg.engine.max_model_len == 1024 and cfg.engine.enforce_eager is True
    assert cfg.sampling.max_new_tokens == 8 and cfg.sampling.temperature == 0.7 and cfg.sampling.seeds == [3, 4]
    assert cfg.sampling.run_seeds() == [3, 4]
    greedy = parse(["--config", str(cfg_file), "--temperature", "0"])
    assert greedy.sampling.run_seeds() == [None] and greedy.sampling.effective()["seeds"] == []


def test_shipped_configs_load(repo):
    for path in sorted((repo / "evaluator" / "configs").glob("*.yaml")):
        cfg = parse(["--config", str(path), "--model", "m", "--data", "d", "--out", "o"])
        assert cfg.sampling.greedy, path


@pytest.mark.parametrize("text, needle", [
    ("engine:\n  dtipe: float32\n", "unknown key engine.dtipe"),
    ("sampling:\n  max_new_tokens: many\n", "sampling.max_new_tokens: expected an integer, got 'many'"),
    ("sampling:\n  top_p: 1.5\n", "sampling.top_p: 1.5 is above the maximum 1.0"),
    ("engine:\n  dtype: int4\n", "engine.dtype: 'int4' is not one of"),
    ("engine: [1]\n", "engine: expected a mapping"),
    ("sampling:\n  temperature: 0.5\n  seeds: []\n", "sampling.seeds: a sampled run"),
])
def test_bad_config_values_name_file_and_key(tmp_path, text, needle):
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text("model: m\ndata: d\nout: o\n" + text)
    with pytest.raises(EvalInputError) as e:
        parse(["--config", str(cfg_file)])
    assert needle in str(e.value)


def test_required_options_and_help(capsys):
    with pytest.raises(EvalInputError, match="model: required"):
        parse(["--data", "d", "--out", "o"])
    for argv in (["--help"], ["run", "--help"], ["compare", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--tensor-parallel-size", "--gpu-memory-utilization", "--max-new-tokens", "--seeds", "--config",
                 "--bootstrap-resamples", "engine options", "sampling options"):
        assert flag in text


# ---- over-long test prompts: the context is cut to fit, counted -------------------------------------


def test_fit_prompts_cuts_the_context_of_an_over_long_prompt(tiny_model_dir, tmp_path):
    from evaluator.inputs import fit_prompts
    from trainer.prompt import PromptEncoder

    enc = PromptEncoder(tiny_model_dir)
    long_ctx = " ".join(f"Sentence {k} of a long passage about the tower." for k in range(60))
    records = [RECORDS[0], {**RECORDS[1], "context": long_ctx}, RECORDS[2]]
    full = enc.encode_prompts(records)
    max_model_len, new = 200, 64
    budget = max_model_len - new
    assert len(full[1]) > budget >= max(len(full[0]), len(full[2]))
    ids, cut = fit_prompts(records, enc, max_model_len, new, tmp_path / "test.jsonl")
    assert ids[0] == full[0] and ids[2] == full[2]  # the others are untouched
    assert len(ids[1]) <= budget
    [c] = cut
    assert c["id"] == RECORDS[1]["id"] and c["line"] == 2 and c["prompt_tokens"] == len(full[1])
    kept = c["kept_context_chars"]
    assert 0 < kept < c["context_chars"] == len(long_ctx)
    assert ids[1] == enc.encode_prompt(RECORDS[1]["instruction"], long_ctx[:kept])
    assert len(enc.encode_prompt(RECORDS[1]["instruction"], long_ctx[: kept + 1])) > budget  # the longest that fits
    assert fit_prompts(records, enc, None, new, tmp_path / "t")[1] == []  # no max_model_len: nothing to fit


def test_fit_prompts_refuses_an_instruction_that_cannot_fit(tiny_model_dir, tmp_path):
    from evaluator.inputs import fit_prompts
    from trainer.prompt import PromptEncoder

    with pytest.raises(EvalInputError, match=r"test.jsonl:1: id 'dolly-000000000001'.*raise --max-model-len"):
        fit_prompts(RECORDS, PromptEncoder(tiny_model_dir), 70, 64, tmp_path / "test.jsonl")


# ---- the published-protocol preset, the compile cache -----------------------------------------------


def test_minillm_protocol_preset_loads_and_is_enforced(repo):
    preset = repo / "evaluator" / "configs" / "protocols" / "minillm-h200.yaml"
    cfg = parse(["--config", str(preset), "--model", "m", "--data", "d", "--out", "o"])
    assert cfg.protocol == "minillm" and cfg.limit == 500 and not cfg.sampling.greedy
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.max_new_tokens) == (1.0, 1.0, 256)
    assert len(cfg.sampling.seeds) == 5
    with pytest.raises(EvalInputError, match="protocol minillm: sampling.temperature must be 1.0, got 0.7"):
        parse(["--config", str(preset), "--model", "m", "--data", "d", "--out", "o", "--temperature", "0.7"])
    with pytest.raises(EvalInputError, match="number of sampling.seeds must be 5, got 3"):
        parse(["--config", str(preset), "--model", "m", "--data", "d", "--out", "o", "--seeds", "1", "2", "3"])
    # the default stays greedy with no protocol
    assert parse(["--model", "m", "--data", "d", "--out", "o"]).protocol == "none"


def test_protocol_record_states_comparability():
    from evaluator.protocols import protocol_record

    metrics = {"per_seed": {str(s): {"rougeL": 0.25 + 0.01 * k} for k, s in enumerate((10, 20, 30, 40, 50))}}
    rec = protocol_record("minillm", metrics)
    assert rec["rougeL_x100"] == pytest.approx(27.0)
    assert rec["rougeL_x100_per_seed"] == pytest.approx([25, 26, 27, 28, 29])
    assert "26.3" in rec["statement"] and "31.6" in rec["statement"] and "comparable" in rec["statement"]


def test_protocol_needs_500_test_records(tmp_path, tiny_model_dir, data_dir, capsys, repo):
    preset = repo / "evaluator" / "configs" / "protocols" / "minillm-h200.yaml"
    assert_fails(capsys, tiny_model_dir, data_dir, tmp_path / "out", "protocol minillm needs 500 test records",
                 extra=("--config", str(preset)))


def test_cache_root_sets_vllm_cache_root(tmp_path, monkeypatch):
    from evaluator.config import EngineConfig
    from evaluator.generate import compile_cache

    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "from-env"))
    assert compile_cache(EngineConfig()) == {"root": str(tmp_path / "from-env"), "torch_compile_cache": "cold"}
    root = tmp_path / "vol" / "vllm"
    (root / "torch_compile_cache" / "abc").mkdir(parents=True)
    assert compile_cache(EngineConfig(cache_root=str(root))) == {"root": str(root), "torch_compile_cache": "warm"}
    import os

    assert os.environ["VLLM_CACHE_ROOT"] == str(root)  # what the engine process inherits
    assert parse(["--model", "m", "--data", "d", "--out", "o", "--cache-root", "/c"]).engine.cache_root == "/c"


def test_report_shows_phases_truncation_and_protocol(tiny_model_dir, tmp_path):
    """metrics.json -> report blocks through the real build_metrics/prediction_rows, with generations made up
    (no engine): the protocol statement, the time by phase and the truncation count are in the report."""
    from evaluator.config import RunConfig, SamplingConfig
    from evaluator.generate import Generation, GenerationRun
    from evaluator.inputs import ModelInfo, TestSplit
    from evaluator.report import run_blocks, to_markdown
    from evaluator.run import build_metrics, prediction_rows, summary_table
    from trainer.prompt import PromptEncoder

    enc = PromptEncoder(tiny_model_dir)
    seeds = [10, 20, 30, 40, 50]
    cfg = RunConfig(model="m", data="d", out="o", limit=500, protocol="minillm",
                    sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=256, seeds=seeds))
    records = RECORDS
    prompt_ids = enc.encode_prompts(records)
    gens = [Generation(i, s, enc.sp.encode(r["response"] if k % 2 else "something else") + [enc.eos_id], "stop")
            for k, s in enumerate(seeds) for i, r in enumerate(records)]
    gen_run = GenerationRun(gens, 12.0, 3.0, "cpu", "0.0", {"model": "m"}, {"root": "/c", "torch_compile_cache": "warm"})
    model = ModelInfo(tiny_model_dir, enc.vocab_size, 2048, {"model.safetensors": "0" * 64}, "1" * 64,
                      "tokenizer.model", "2" * 64)
    split = TestSplit(tmp_path / "test.jsonl", "3" * 64, {"max_length": 512, "test_longer_than_max_length": 2},
                      records)
    rows = prediction_rows(records, prompt_ids, gen_run, enc, workers=1)
    cut = {"count": 1, "max_prompt_tokens": 3840, "examples": [{"id": RECORDS[1]["id"]}]}
    m = build_metrics(cfg, model, split, records, prompt_ids, gen_run, rows, cut)
    m["timings"] = {"scoring_workers": 2, "hash_in_background": True, "hash_seconds": 1.5,
                    "engine_start_seconds": 12.0, "generate_seconds": 3.0, "score_seconds": 0.5,
                    "report_seconds": 0.25, "total_seconds": 18.0}
    assert m["protocol"]["rougeL_x100"] == pytest.approx(100 * m["overall"]["rougeL"]["f1"]["mean"])
    md = to_markdown(run_blocks(m, rows, "by_category.png"))
    assert "MiniLLM Dolly protocol" in md and "26.3" in md and "31.6" in md and "comparable" in md
    assert "Time by phase" in md and "| engine start | 12.00 |" in md and "torch.compile cache warm" in md
    assert "1 test prompt(s) were longer than 3840 tokens" in md
    assert "made before prepare's 512-token training cap, so it keeps its 2 example(s)" in md
    assert "one sentence per line" in md
    assert "MiniLLM Dolly protocol" in summary_table(m) and "engine start 12.0" in summary_table(m)


def test_sharded_weights_hashed_in_parallel_equal_hashlib(tmp_path):
    from evaluator.inputs import ModelInfo, combined_sha256

    paths = []
    for k in range(3):
        f = tmp_path / f"model-0000{k + 1}-of-00003.safetensors"
        f.write_bytes(bytes([k]) * (1 << 20) * (k + 1))
        paths.append(f)
    info = ModelInfo(tmp_path, 1, None, {}, "", "tokenizer.model", "0" * 64, tuple(paths))
    assert info.hash_weights() >= 0
    want = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert info.weight_files == want and info.weights_sha256 == combined_sha256(want)
    assert info.record()["weight_files"] == want


def test_engine_speed_knobs_reach_vllm_llm_kwargs():
    from evaluator.generate import engine_kwargs

    cfg = parse(["--model", "m", "--data", "d", "--out", "o", "--max-num-seqs", "512",
                 "--cudagraph-capture-sizes", "512", "1", "256"])
    kw = engine_kwargs("m", cfg.engine, "cuda")
    assert kw["max_num_seqs"] == 512 and kw["compilation_config"] == {"cudagraph_capture_sizes": [1, 256, 512]}
    plain = engine_kwargs("m", parse(["--model", "m", "--data", "d", "--out", "o"]).engine, "cuda")
    assert "max_num_seqs" not in plain and "compilation_config" not in plain  # vLLM's defaults unless set


def test_engine_core_runs_in_process_on_the_cpu_unless_told_otherwise(monkeypatch):
    """VLLM_ENABLE_V1_MULTIPROCESSING is what vLLM reads when the LLM is built: the config decides it, per device
    when unset (in-process on the CPU, vLLM's own processes on a GPU)."""
    from evaluator.generate import engine_kwargs

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "unset by the test")  # restored afterwards
    base = ["--model", "m", "--data", "d", "--out", "o"]
    for flags, device, want in [([], "cpu", "0"), ([], "cuda", "1"), (["--in-process"], "cuda", "0"),
                                (["--no-in-process"], "cpu", "1")]:
        engine_kwargs("m", parse(base + flags).engine, device)
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == want, (flags, device)


def test_line_separator_characters_inside_a_record_do_not_split_it(tmp_path):
    """Dolly text (and a model's generations) can hold U+2028, U+2029 or U+0085, which JSON writes unescaped with
    ensure_ascii=False and which str.splitlines() treats as line breaks: the record must come back whole."""
    from evaluator.inputs import read_test_split

    odd = {**RECORDS[0], "id": "dolly-odd", "response": "First line\u2028second\u2029third\x85fourth\x0cfifth."}
    lines = [*good_lines(), json.dumps(odd, ensure_ascii=False)]
    data = write_data_dir(tmp_path / "data", lines)
    split = read_test_split(data)
    assert [r["id"] for r in split.records] == [*(r["id"] for r in RECORDS), "dolly-odd"]
    assert split.records[-1]["response"] == odd["response"]
