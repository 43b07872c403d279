"""Embedder: prefixes, truncation, bad texts, widths, invariances, dtypes (``embedder``: the
tiny model's fp32 encoder, conftest's)."""

import numpy as np
import pytest
import torch

from pipeline import Embedder
from pipeline.model.builder import sample_texts
from pipeline.tokenize import TASK_PREFIXES, TokenizerError, add_prefix, text_problem

DIMS = (64, 32, 16)


def test_widths_are_unit_norm_and_nested(embedder):
    texts = sample_texts()
    out = embedder.encode(texts, dims=DIMS)
    assert set(out) == set(DIMS)
    for d in DIMS:
        assert out[d].shape == (len(texts), d) and out[d].dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out[d], axis=1), 1.0, atol=1e-5)
    # A narrower width is the wider vector's prefix, renormalised (truncate, then normalise).
    head = out[64][:, :16] / np.linalg.norm(out[64][:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(out[16], head, atol=1e-6)


def test_same_vector_alone_in_any_batch_and_order(embedder):
    texts = sample_texts()
    together = embedder.encode(texts, dims=(64,))[64]
    rng = np.random.default_rng(1)
    order = rng.permutation(len(texts))
    shuffled = embedder.encode([texts[i] for i in order], dims=(64,))[64]
    assert np.abs(shuffled - together[order]).max() < 1e-5
    for i in (0, 17, len(texts) - 1):
        alone = embedder.encode([texts[i]], dims=(64,))[64]
        assert np.abs(alone[0] - together[i]).max() < 1e-5


def test_small_token_budget_gives_the_same_vectors(tiny_model_dir, embedder):
    texts = sample_texts()
    small = Embedder.from_pretrained(tiny_model_dir, device="cpu", max_tokens_per_batch=512)
    a = small.encode(texts, dims=(64,))[64]
    assert small.last_stats.batches > 3
    assert np.abs(a - embedder.encode(texts, dims=(64,))[64]).max() < 1e-5


def test_task_prefixes(embedder):
    text = "what is a mixture of experts"
    for task, prefix in TASK_PREFIXES.items():
        ids = embedder.tokenize([text], task=task).sequence(0)
        want = embedder.tokenizer.encode([prefix + text]).sequence(0)
        assert np.array_equal(ids, want), task
    doc, query = (embedder.encode([text], task=t, dims=(64,))[64] for t in ("document", "query"))
    assert not np.allclose(doc, query)
    with pytest.raises(ValueError, match="unknown task 'passage'"):
        embedder.encode([text], task="passage", dims=(64,))


def test_known_prefix_is_not_added_twice(embedder):
    assert add_prefix("search_query: hi", "search_document: ") == "search_query: hi"
    once = embedder.encode(["search_document: hello"], dims=(64,))[64]
    plain = embedder.encode(["hello"], dims=(64,))[64]
    assert np.abs(once - plain).max() < 1e-6


def test_truncation_to_512_tokens_is_counted(embedder):
    long_text = "mixture of experts " * 2000
    batch = embedder.tokenize([long_text, "short"])
    assert batch.lengths[0] == 512 and batch.lengths[1] < 512
    seq = batch.sequence(0)
    assert seq[0] == 0 and seq[-1] == 2  # <s> ... </s> kept
    assert batch.truncated.tolist() == [True, False]
    embedder.encode([long_text, "short"], dims=(64,))
    assert embedder.last_stats.texts_truncated == 1


@pytest.mark.parametrize(
    "text",
    [
        "x" * 1_000_000,  # 1 MB: truncated
        "\x00\x01\x07 control \x1b[31m characters \x7f",
        "mixed 混合 スクリプト смешанный مختلط मिश्रित 🙂 text",
        "\u200b\u200d zero-width and combining e\u0301",
        "\ufeffbyte order mark",
    ],
)
def test_odd_but_valid_texts_embed(embedder, text):
    out = embedder.encode([text], dims=(64,))[64]
    assert np.isfinite(out).all()
    assert abs(np.linalg.norm(out) - 1.0) < 1e-5


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("", "is empty or whitespace only"),
        (" \t\n\u3000", "is empty or whitespace only"),
        ("lone \ud800 surrogate", "has a lone surrogate: U\\+D800 at position 5"),
        (None, "is null"),
        (b"bytes", "is bytes, not str"),
        (42, "is int, not str"),
    ],
)
def test_bad_texts_raise_a_clear_error_naming_the_text(embedder, bad, reason):
    assert text_problem(bad) is not None
    with pytest.raises(ValueError, match=rf"text 1: text {reason}"):
        embedder.encode(["fine", bad, "also fine"], dims=(64,))


def test_single_string_instead_of_list(embedder):
    with pytest.raises(TypeError, match="not a single string"):
        embedder.encode("just one", dims=(64,))


def test_dims_are_checked(embedder):
    with pytest.raises(ValueError, match=r"768.*\[1, 64\]"):
        embedder.encode(["a"])  # default (768, 256) does not fit a 64-wide model
    with pytest.raises(ValueError, match="repeat"):
        embedder.encode(["a"], dims=(32, 32))


def test_bf16_matches_fp32_by_cosine(tiny_model_dir, embedder):
    texts = sample_texts()
    bf16 = Embedder.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    a = embedder.encode(texts, dims=(64,))[64]
    b = bf16.encode(texts, dims=(64,))[64]
    assert (a * b).sum(axis=1).min() >= 0.999


def test_dtype_names(tiny_model_dir):
    assert Embedder.from_pretrained(tiny_model_dir, device="cpu", dtype="bf16").encoder.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        Embedder.from_pretrained(tiny_model_dir, device="cpu", dtype="float8")


def test_missing_tokenizer(tiny_model_dir, tmp_path):
    import shutil

    dst = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (dst / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Embedder.from_pretrained(dst, device="cpu")


def test_tokenizer_from_another_model(tiny_model_dir, tmp_path):
    import json
    import shutil

    dst = shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((dst / "config.json").read_text())
    # Shrink the vocabulary below the tokenizer's: the weights must shrink with it.
    from safetensors.torch import load_file, save_file

    state = load_file(str(dst / "model.safetensors"))
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"][:512]
    save_file(state, str(dst / "model.safetensors"))
    cfg["vocab_size"] = 512
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="not from the same model"):
        Embedder.from_pretrained(dst, device="cpu")


def test_tokenizer_build_is_deterministic(tmp_path, tiny_model_dir):
    from pipeline.model.builder import build_model_dir

    again = build_model_dir(tmp_path / "again", "tiny", seed=0)
    assert (again / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    assert (again / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()


class RecordingStaging:
    """The CPU's staging, recording the device phase's steps in order."""

    def __init__(self, staging, encoder, steps: list) -> None:
        self.staging, self.steps = staging, steps
        forward = encoder.forward_packed

        def recorded_forward(batch, **kw):
            steps.append(("forward", batch.num_tokens))
            return forward(batch, **kw)

        encoder.forward_packed = recorded_forward

    def pin(self, packed):
        self.steps.append(("pin", packed.num_tokens))
        return self.staging.pin(packed)

    def upload(self, packed):
        self.steps.append(("upload", packed.num_tokens))
        return self.staging.upload(packed)

    def ready(self, upload):
        return self.staging.ready(upload)

    def host_buffer(self, rows, cols, dtype):
        return self.staging.host_buffer(rows, cols, dtype)

    def download(self, host, device):
        self.steps.append(("download", tuple(device.shape), device.dtype))
        self.staging.download(host, device)

    def wait(self):
        self.steps.append(("wait",))


def test_device_phase_uploads_ahead_and_syncs_once(tiny_model_dir):
    """Batch g+1's ids are sent before g's forward is queued; per batch one copy back of its
    width vectors in the output dtype (and the pooled ones when asked); one host wait."""
    texts = sample_texts()[:24]
    small = Embedder.from_pretrained(tiny_model_dir, device="cpu", max_tokens_per_batch=512)
    small.max_tokens_per_batch = 128  # several batches of a few texts (below the 512 limit)
    batch = small.tokenize(texts)
    groups = small.plan(batch.lengths)
    plain = small.embed_tokenized(batch, DIMS, groups)
    steps = []
    small.staging = RecordingStaging(small.staging, small.encoder, steps)
    out = small.embed_tokenized(batch, DIMS, groups, pooled=True, dtype="float16")
    sizes = [int(batch.lengths[g].sum()) for g in groups]
    G = len(groups)
    assert G >= 3
    want = [("pin", t) for t in sizes] + [("upload", sizes[0])]
    for g in range(G):
        want += [("upload", sizes[g + 1])] if g + 1 < G else []
        want += [("forward", sizes[g]), ("download", (len(groups[g]), sum(DIMS)), torch.float16),
                 ("download", (len(groups[g]), 64), torch.float32)]
    assert steps == want + [("wait",)]
    for d in DIMS:
        assert out[d].dtype == np.float16
        np.testing.assert_array_equal(out[d], plain[d].astype(np.float16))
    with pytest.raises(ValueError, match="output dtype 'bfloat16'"):
        small.embed_tokenized(batch, DIMS, dtype="bfloat16")
