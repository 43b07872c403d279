"""The README's demo command: the bundled corpus through the real job on a local Ray, and
what it prints: the short report by default, the summary as JSON with ``--json``."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_demo_embeds_the_bundled_corpus(cluster, tmp_path, tiny_model_dir, capsys):
    """On the suite's shared Ray (the demo joins a Ray this process has; the command starts a
    local one of its own, as test_pipeline_e2e's subprocess run does)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--model-dir", str(tiny_model_dir),
                 "--progress", "off"]) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_in"] == summary["rows_embedded"] == 32 and summary["reconciled"]
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert sorted(table["id"].to_pylist()) == [f"doc-{i:04d}" for i in range(32)]
    assert len(set(table["lang"].to_pylist())) == 23
    for width in (64, 32, 16):
        vectors = np.stack(table[f"embedding_{width}"].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    # The short report for people: rows in, embedded, rejected; tokens/s and wall time; where
    # the output and its _summary.json are. Not the JSON summary.
    printed = capsys.readouterr().out
    assert '"rows_embedded"' not in printed, printed
    assert re.search(r"\b32 in, 32 embedded, 0 rejected\b", printed), printed
    work = re.search(r"\bthis run: 3 of 3 unit\(s\) committed in ([\d.]+) s; ([\d,]+) tokens "
                     r"encoded, ([\d,]+) tokens/s over the ([\d.]+) s the graph ran, [\d,]+ "
                     r"once the encoders were up", printed)
    assert work, printed
    # The command's time, Ray's start too: printed to a tenth of a second (3.44 s is "3.4");
    # the rate is over the graph's own seconds, printed beside it.
    assert float(work.group(1)) >= summary["wall_s"] - 0.05 > 0
    assert int(work.group(2).replace(",", "")) == summary["tokens_now"] == summary["tokens"] > 0
    assert int(work.group(3).replace(",", "")) == pytest.approx(summary["tokens_per_s"], abs=1)
    assert float(work.group(4)) == pytest.approx(summary["wall_s"], abs=0.05)
    assert f"output: {out}/" in printed and f"{out}/_summary.json" in printed
    assert "_rejects" not in printed  # nothing rejected, no rejects folder to point at

    # Rerunning the demo replaces its output instead of refusing it; --json prints the summary.
    assert main(["demo", "--out", str(out), "--model-dir", str(tiny_model_dir),
                 "--progress", "off", "--json"]) == 0
    assert len(list(out.glob("part-*.parquet"))) == len(summary["output_files"])
    printed = capsys.readouterr().out
    start = re.search(r"^\{$", printed, re.M)  # json.dumps(indent=2): "{" on a line
    assert start, printed
    shown, _ = json.JSONDecoder().raw_decode(printed, start.start())
    again = json.loads((out / "_summary.json").read_text())
    assert shown["rows_embedded"] == again["rows_embedded"] == 32
    assert {k: v for k, v in again.items() if k not in ("config", "output_files")} == shown
    assert "tokens/s" not in printed
