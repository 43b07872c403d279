"""The benchmark command runs end to end (tiny size) and reports what it measured."""

import json

import numpy as np
import pytest
import torch

from pipeline.bench import encoder as bench, gpu as gpu_bench, workload
from pipeline.bench.__main__ import main as bench_main
from pipeline.model import cpu
from pipeline.model.builder import REAL_CONFIG


def test_bench_encoder_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_main(["encoder", "--size", "tiny", "--texts", "12", "--dtypes", "float32",
                "--device", "cpu", "--json", str(out)])
    result = json.loads(out.read_text())
    paths = {r["path"]: r for r in result["results"]}
    assert set(paths) == {"packed", "baseline"}
    assert paths["packed"]["tokens"] == paths["baseline"]["tokens"] > 0
    assert paths["packed"]["matmul_padding"] == 0.0 and paths["baseline"]["matmul_padding"] > 0
    printed = capsys.readouterr().out
    assert "packed / baseline" in printed
    # The roofline measured on the spot, and each path as a fraction of it.
    packed = paths["packed"]
    assert packed["matmul_tflops"] > 0 and packed["roofline_tokens_per_s"] > 0
    assert packed["of_roofline"] == pytest.approx(
        packed["tokens_per_s"] / packed["roofline_tokens_per_s"], abs=1e-3)
    assert "float32: matmul roofline here" in printed and "of it" in printed
    assert isinstance(result["header"]["cpu_features"], list)


@pytest.mark.skipif(not cpu.has_bf16_matmul(), reason="the benchmark skips bf16 on a CPU "
                    "without AVX-512 BF16 or AMX")
def test_bench_encoder_compares_half_precision_with_float32_text_by_text(tmp_path, capsys):
    dtype = "bfloat16"
    out = tmp_path / "bench.json"
    bench_main(["encoder", "--size", "tiny", "--texts", "12", "--dtypes", f"float32,{dtype}",
                "--device", "cpu", "--no-baseline", "--repeats", "2", "--json", str(out)])
    rows = {r["dtype"]: r for r in json.loads(out.read_text())["results"]}
    assert "min_cosine_to_float32" not in rows["float32"]
    assert 0.999 <= rows[dtype]["min_cosine_to_float32"] <= 1.0
    assert rows[dtype]["tokens_per_s_seen"] > 0  # the second run: shapes seen before
    assert f"{dtype}: lowest per-text cosine to float32" in capsys.readouterr().out


def test_roofline_times_the_models_own_matmuls():
    per_token = sum(2 * n_in * n_out * times for n_in, n_out, times in bench.matmul_shapes(REAL_CONFIG))
    cfg = REAL_CONFIG
    router = len(cfg.moe_layers) * 2 * cfg.hidden_size * cfg.num_experts
    assert per_token == bench.flops_per_sequence(cfg, 1) - 36_864 - router
    # min_cosine: text by text, not on average
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert bench.min_cosine(a, torch.tensor([[1.0, 0.0], [1.0, 1.0]])) == pytest.approx(2 ** -0.5)


def test_cpu_features_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu.cpu_features(str(info)) == ("avx512_bf16", "avx512f", "avx2")
    assert cpu.has_bf16_matmul(("avx512_bf16",)) and cpu.has_bf16_matmul(("amx_bf16",))
    assert not cpu.has_bf16_matmul(("avx512f", "avx2"))
    assert cpu.cpu_features(str(tmp_path / "missing")) == ()


def test_flops_per_token_match_the_brief():
    # MISSION.md: ~227 MFLOP of matmuls per token plus 36,864 x L for attention at length L.
    per_token = bench.flops_per_sequence(REAL_CONFIG, 1) - 36_864
    assert per_token == pytest.approx(227e6, rel=0.01)
    assert bench.flops_per_sequence(REAL_CONFIG, 100) == pytest.approx(100 * (per_token + 36_864 * 100))


def test_length_mix_is_realistic():
    lengths = workload.length_mix(192)
    assert 100 <= float(sorted(lengths)[96]) <= 125 and lengths.max() <= 512 and lengths.min() >= 8


def test_bench_texts_follow_the_length_mix(tiny_model_dir):
    from pipeline.bench.workload import texts_of_lengths
    from pipeline.tokenize import TextTokenizer

    tokenizer = TextTokenizer.from_dir(tiny_model_dir)
    targets = workload.length_mix(40, seed=3)
    texts = texts_of_lengths(targets, tokenizer, seed=3)
    got = tokenizer.encode(["search_document: " + t for t in texts]).lengths
    # The fewest words reaching each target: over it by at most one "word" (a CJK sentence
    # without spaces is one word of many tokens).
    assert (got >= targets).all() and (got - targets).max() <= 40
    assert abs(float(got.sum()) / targets.sum() - 1) < 0.05


@pytest.mark.slow
@pytest.mark.ray
def test_bench_pipeline_smoke(tmp_path, tiny_model_dir):
    out = tmp_path / "pipe.json"
    bench_main(["pipeline", "--size", "tiny", "--tokenizer", "small",
                "--model-dir", str(tiny_model_dir), "--texts", "30",
                "--shards", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    alone, piped = result["encoder_alone"], result["pipeline"]
    assert piped["tokens"] == alone["tokens"] > 0 and piped["rows_embedded"] == 30
    assert piped["reconciled"] and piped["tokens_per_s_steady"] > 0
    assert result["steady_vs_alone"] == pytest.approx(
        piped["tokens_per_s_steady"] / alone["tokens_per_s"], rel=1e-2, abs=1e-3)



def test_bench_model_dir_must_hold_the_tokenizer_asked_for(tiny_model_dir):
    class Args:
        size, tokenizer, lexicon, model_dir = "tiny", "real", "synthetic", str(tiny_model_dir)

    with pytest.raises(ValueError, match="--tokenizer small"):
        workload.bench_model_dir(Args)
    Args.tokenizer = "small"
    assert workload.bench_model_dir(Args) == tiny_model_dir


def test_bench_nightly_edits_the_corpus_as_asked():
    # The nightly benchmark itself needs four runs (minutes); its night-2 corpus is checked here.
    import numpy as np

    from pipeline.bench.nightly import edit_corpus

    class Args:
        change, delete, add = 0.1, 0.05, 0.05

    texts = [f"text {i}" for i in range(100)]
    ids, edited = edit_corpus(texts, Args, np.random.default_rng(0))
    by_id = dict(zip(ids, edited))
    assert len(ids) == len(set(ids)) and len(ids) == len(edited)
    assert sum(1 for i in range(100) if i not in by_id) <= 5  # deleted (not among the changed)
    assert sum(1 for i in range(100) if i in by_id and by_id[i] != texts[i]) == 10
    assert [i for i in ids if i >= 100] == list(range(100, 105))


def test_bench_chunking_smoke(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "chunking.json"
    bench_main(["chunking", "--model-dir", str(tiny_model_dir), "--docs", "4", "--chars", "3000",
                "--big-mb", "0.05", "--json", str(out)])
    import json

    result = json.loads(out.read_text())
    assert set(result["tokens_per_s"]) == {"plain", "truncate", "chunk"}
    assert result["chunks"] >= 4 and result["big_document"]["chars"] == 50_000
    assert result["document_tokens"] > 4 * 1000


def test_bench_parquet_times_both_encodings_of_the_same_rows(tmp_path, capsys):
    import pyarrow as pa

    threads = pa.cpu_count()
    out = tmp_path / "parquet.json"
    bench_main(["parquet", "--rows", "300", "--dims", "16,8", "--repeats", "1",
                "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["dtypes"]) == {"float32", "float16"}
    for r in result["dtypes"].values():  # each file was read back equal to the table
        assert r["pyarrow_defaults"]["bytes"] > 0 and r["writer_encodings"]["bytes"] > 0
        assert r["write_speedup"] > 0 and r["read_speedup"] > 0
    assert pa.cpu_count() == threads  # the benchmark's one thread is given back


@pytest.fixture(scope="module")
def real_tokenizer(tmp_path_factory):
    """The real-size benchmark tokenizer of the synthetic lexicon (no wordfreq needed), built
    into a cache of this module's own."""
    from pipeline.model.builder import cached_real_size_tokenizer

    cache = tmp_path_factory.mktemp("tokenizer-cache")
    return cache, cached_real_size_tokenizer("synthetic", cache_dir=cache)


def test_real_size_tokenizer_is_xlmr_shaped(real_tokenizer):
    from pipeline.model.builder import cached_real_size_tokenizer
    from pipeline.tokenize import TextTokenizer

    cache, text = real_tokenizer
    spec = json.loads(text)
    assert spec["model"]["type"] == "Unigram" and len(spec["model"]["vocab"]) >= 250_000
    assert [p for p, _ in spec["model"]["vocab"][:4]] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert [n["type"] for n in spec["normalizer"]["normalizers"]] == ["NFKC", "Replace"]
    assert spec["pre_tokenizer"]["type"] == "Metaspace"
    assert spec["post_processor"]["single"][0]["SpecialToken"]["id"] == "<s>"
    tok = TextTokenizer.from_json(text)  # checks the special ids itself
    assert tok.vocab_size == 250_002
    mask = spec["added_tokens"][-1]
    assert mask["content"] == "<mask>" and mask["id"] == 250_001
    ids = tok.encode(["Ｈｅｌｌｏ   world", "敏捷"]).ids.tolist()
    assert ids[0] == 0 and ids.count(2) == 2 and 3 not in ids[:ids.index(2)]
    # built once: the second call reads the cached file
    assert len(list(cache.iterdir())) == 1
    assert cached_real_size_tokenizer("synthetic", cache_dir=cache) == text


def test_multilingual_texts_follow_the_mix(real_tokenizer):
    from pipeline.model import lexicon
    from pipeline.tokenize import TextTokenizer

    tok = TextTokenizer.from_json(real_tokenizer[1]).untruncated()
    texts = workload.multilingual_texts(300, tok, seed=0, source="synthetic")
    langs = lexicon.languages("synthetic")
    assert len({lang.script for lang in langs}) >= 20
    encodings = tok.encode_batch(["search_document: " + t for t in texts])
    lengths = np.array([len(e.ids) for e in encodings])
    assert 90 <= np.median(lengths) <= 135 and lengths.max() > 512
    assert sum(3 in e.ids for e in encodings) == 0  # no <unk>
    han = [t for t in texts if any("\u4e00" <= c <= "\u62ff" for c in t[:3])]
    assert han and all(" " not in t for t in han)  # CJK is written without spaces
    again = [workload.multilingual_texts(20, tok, seed=5, source="synthetic") for _ in range(2)]
    assert again[0] == again[1] and again[0] != texts[:20]  # deterministic per seed


def test_bench_tokenizer_smoke(real_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NOMIC_PIPELINE_CACHE", str(real_tokenizer[0]))
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")  # restored after the test
    out = tmp_path / "tok.json"
    bench_main(["tokenizer", "--texts", "60", "--batch", "16", "--lexicon", "synthetic",
                "--repeats", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    paths = result["paths"]
    assert set(paths) == {"raw", "raw_truncating", "text_tokenizer", "stage"}
    assert paths["stage"]["tokens"] == paths["raw_truncating"]["tokens"] <= paths["raw"]["tokens"]
    assert result["vocab_size"] == 250_002 and result["scripts"] >= 20
    assert result["stage_vs_raw"] == pytest.approx(
        paths["stage"]["tokens_per_s"] / paths["raw"]["tokens_per_s"], rel=1e-2)


def test_bench_gpu_runs_every_section_on_the_cpu(real_tokenizer, tmp_path, monkeypatch):
    """The GPU command's code paths, tiny and on the CPU (CUDA-only parts reported skipped)."""
    monkeypatch.setenv("NOMIC_PIPELINE_CACHE", str(real_tokenizer[0]))
    out = tmp_path / "gpu.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is ~100x faster on a busy machine
    try:
        bench_main(["gpu", "--device", "cpu", "--size", "tiny", "--dtype", "float32",
                    "--texts", "8", "--budgets", "512", "--repeats", "1", "--stage-texts", "6",
                    "--lexicon", "synthetic", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    s = result["sections"]
    assert result["failed"] == [] and list(s) == list(gpu_bench.SECTIONS)
    assert s["parity"]["ok"] and s["parity"]["max_abs_vs_cpu"] == 0.0  # the CPU against itself
    assert "skipped" in s["sync_free"] and "skipped" in s["attention"]["varlen"]
    assert 0.99 < s["bf16_cosine"]["cosine_min"] <= 1.0
    assert s["budgets"]["512"]["tokens"] == result["tokens"]
    assert {"grouped", "loop"} <= set(s["moe_backends"])
    assert s["attention"]["padded"]["padding"] >= s["attention"]["grid_runs"]["padding"]
    assert s["baseline"]["packed_vs_baseline"] > 0
    assert s["stage"]["rows_out"] == s["stage"]["texts"] == 6 and s["stage"]["tokens"] > 6


def test_bench_gpu_reports_a_failing_section(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_bench, "parity", lambda ctx: 1 / 0)
    with pytest.raises(SystemExit, match="parity"):
        bench_main(["gpu", "--device", "cpu", "--size", "tiny", "--texts", "4",
                    "--sections", "parity", "--json", str(tmp_path / "g.json")])
    section = json.loads((tmp_path / "g.json").read_text())["sections"]["parity"]
    assert section["error"].startswith("ZeroDivisionError")


def test_lexicon_without_wordfreq(monkeypatch):
    """wordfreq is a benchmark-only dependency: without it 'auto' takes the synthetic words
    and asking for it by name says how to get it."""
    from pipeline.model import lexicon

    monkeypatch.setattr(lexicon, "wordfreq", None)
    assert lexicon.resolve_source("auto") == "synthetic"
    with pytest.raises(ValueError, match="pip install wordfreq"):
        lexicon.resolve_source("wordfreq")


def test_rate_encoder_in_the_encode_stage(tiny_model_dir, tokenizer_json):
    """The --encoder-rate stand-in as the encode stage's engine (no Ray): unit vectors of the
    asked widths, a function of the text, and tokens / R seconds of 'math' slept."""
    import functools

    from pipeline.bench.chunking import rows
    from pipeline.bench.rate import RateEncoder
    from pipeline.stages.embed import EncodeStage, TokenizeStage

    tokenized = TokenizeStage(tokenizer_json, "document")(rows(["a b c", "ünïcode", "a b c"]))
    stage = EncodeStage(str(tiny_model_dir), revision=None, device="cpu", dtype="float32",
                        dims=(64, 32), output_dtype="float32", max_tokens_per_batch=None,
                        engine=functools.partial(RateEncoder, rate=1e5))
    out = stage(tokenized)
    for width in (64, 32):
        vectors = np.array(out[f"embedding_{width}"].to_pylist())
        assert vectors.shape == (3, width) and np.allclose(np.linalg.norm(vectors, axis=1), 1)
        assert (vectors[0] == vectors[2]).all()
    tokens = int(np.sum(tokenized["__num_tokens"].to_numpy()))
    assert stage.embedder.math_s == pytest.approx(tokens / 1e5)


def test_cpu_sampler_counts_child_processes():
    import subprocess
    import sys

    from pipeline.bench.rate import CpuSampler, stage_of

    assert [stage_of(t) for t in ("ray::MapWorker(MapBatches(TokenizeStage)).submit",
                                  "ray::MapWorker(MapBatches(EncodeStage)).__init__",
                                  "ray::ReadShard->SplitBlocks(2)", "ray::MapBatches(write_batch)",
                                  "ray::IDLE", "/usr/bin/raylet")] == [
        "tokenize", "actor_start", "read", "write", "ray_other", "ray_system"]
    with CpuSampler(rescan=0.05) as cpu:
        child = subprocess.run([sys.executable, "-S", "-c", "import time\nt = time.process_time()\n"
                                "while time.process_time() - t < 0.4: pass\n"
                                "time.sleep(0.3)  # alive while sampled once more"], check=True)
    assert child.returncode == 0
    assert 0.3 < cpu.outside.get("ray_system", 0.0) + cpu.streaming.get("ray_system", 0.0) < 1.0


def test_the_encoder_stand_in_is_benchmark_only():
    """No module outside pipeline/bench names the stand-in, and no run option sets it."""
    import dataclasses
    from pathlib import Path

    import pipeline
    from pipeline.config import RunConfig

    root = Path(pipeline.__file__).parent
    named = [str(p.relative_to(root)) for p in root.rglob("*.py") if "bench" not in p.parts
             and any(w in p.read_text() for w in ("RateEncoder", "rate_spec", "encoder_rate"))]
    assert named == []
    assert not [f.name for f in dataclasses.fields(RunConfig) if "rate" in f.name]


def test_bench_encoder_times_int8_matmuls_when_asked(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_main(["encoder", "--size", "tiny", "--texts", "12", "--dtypes", "float32,bfloat16",
                "--device", "cpu", "--no-baseline", "--int8", "--json", str(out)])
    header = json.loads(out.read_text())["header"]
    probe = header["int8_matmul"]
    if "error" in probe:  # a torch without an int8 matmul on this CPU: said, not hidden
        assert "int8 matmuls" in capsys.readouterr().out
        return
    assert probe["int8_matmul_tops"] > 0 and probe["bfloat16_matmul_tflops"] > 0
    assert probe["vs_bfloat16_matmuls"] == pytest.approx(
        probe["int8_matmul_tops"] / probe["bfloat16_matmul_tflops"], rel=0.02)
    assert "x bf16's matmuls here" in capsys.readouterr().out


def test_the_int8_probe_records_a_missing_kernel(monkeypatch):
    import torch

    from pipeline.model.builder import SIZES

    monkeypatch.delattr(torch, "_int_mm")
    probe = bench.int8_matmul_ceiling(SIZES["tiny"], torch.device("cpu"), rows=64, repeats=1)
    assert probe["error"].startswith("AttributeError")
