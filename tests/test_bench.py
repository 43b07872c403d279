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
