"""The README's demo command: the bundled corpus through the real job on a local Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main

pytestmark = pytest.mark.slow


def test_demo_embeds_the_bundled_corpus(tmp_path, tiny_model_dir, capsys):
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
    printed = capsys.readouterr().out
    assert '"rows_embedded": 32' in printed
    # Rerunning the demo replaces its output instead of refusing it.
    assert main(["demo", "--out", str(out), "--model-dir", str(tiny_model_dir),
                 "--progress", "off"]) == 0
    assert len(list(out.glob("part-*.parquet"))) == len(summary["output_files"])
