"""The benchmark command runs end to end (tiny size) and reports what it measured."""

import json

import pytest

from pipeline import bench
from pipeline.model.builder import REAL_CONFIG


def test_bench_encoder_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["encoder", "--size", "tiny", "--texts", "12", "--dtypes", "float32",
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
    lengths = bench.length_mix(192)
    assert 100 <= float(sorted(lengths)[96]) <= 125 and lengths.max() <= 512 and lengths.min() >= 8


def test_bench_texts_follow_the_length_mix(tiny_model_dir):
    from pipeline.bench_pipeline import texts_of_lengths
    from pipeline.tokenize import TextTokenizer

    tokenizer = TextTokenizer.from_dir(tiny_model_dir)
    targets = bench.length_mix(40, seed=3)
    texts = texts_of_lengths(targets, tokenizer, seed=3)
    got = tokenizer.encode(["search_document: " + t for t in texts]).lengths
    # The fewest words reaching each target: over it by at most one "word" (a CJK sentence
    # without spaces is one word of many tokens).
    assert (got >= targets).all() and (got - targets).max() <= 40
    assert abs(float(got.sum()) / targets.sum() - 1) < 0.05


@pytest.mark.slow
def test_bench_pipeline_smoke(tmp_path, tiny_model_dir):
    out = tmp_path / "pipe.json"
    bench.main(["pipeline", "--size", "tiny", "--model-dir", str(tiny_model_dir), "--texts", "30",
                "--shards", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    alone, piped = result["encoder_alone"], result["pipeline"]
    assert piped["tokens"] == alone["tokens"] > 0 and piped["rows_embedded"] == 30
    assert piped["reconciled"] and piped["tokens_per_s_steady"] > 0
    assert result["steady_vs_alone"] == pytest.approx(
        piped["tokens_per_s_steady"] / alone["tokens_per_s"], rel=1e-2, abs=1e-3)


@pytest.mark.slow
def test_bench_nightly_smoke(tmp_path, tiny_model_dir):
    out = tmp_path / "nightly.json"
    bench.main(["nightly", "--size", "tiny", "--model-dir", str(tiny_model_dir), "--texts", "40",
                "--shards", "2", "--change", "0.1", "--delete", "0.05", "--add", "0.05",
                "--json", str(out)])
    result = json.loads(out.read_text())
    n1, n2, n3 = result["night1_full"], result["night2_incremental"], result["night3_unchanged"]
    assert n1["rows_embedded"] == 40 and n1["reconciled"]
    assert (n2["rows_changed"], n2["rows_deleted"], n2["rows_new"]) == (4, 2, 2)
    assert n2["rows_embedded"] == 6 and n2["rows_reused"] == 34
    assert n3["rows_embedded"] == 0 and n3["rows_reused"] == 40
    assert result["plain_run_on_night2_corpus"]["rows_embedded"] == 40
