"""The benchmark command runs end to end (tiny size) and reports what it measured."""

import json

import pytest

from pipeline.bench import encoder as bench, workload
from pipeline.bench.__main__ import main as bench_main
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
    assert "packed / baseline" in capsys.readouterr().out


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
    bench_main(["pipeline", "--size", "tiny", "--model-dir", str(tiny_model_dir), "--texts", "30",
                "--shards", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    alone, piped = result["encoder_alone"], result["pipeline"]
    assert piped["tokens"] == alone["tokens"] > 0 and piped["rows_embedded"] == 30
    assert piped["reconciled"] and piped["tokens_per_s_steady"] > 0
    assert result["steady_vs_alone"] == pytest.approx(
        piped["tokens_per_s_steady"] / alone["tokens_per_s"], rel=1e-2, abs=1e-3)



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
