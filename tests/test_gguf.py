"""GGUF files (llama.cpp's format): written here with gguf-py's writer in llama.cpp's layout,
then read back by ``pipeline.model.gguf`` and checked against the safetensors model.

The writer below is independent of the reader's key map: tensor names come from gguf-py's own
name table for ``nomic-bert-moe`` (llama.cpp's), the expert matrices are laid out as llama.cpp's
converter does (``w1`` viewed ``[E, F, D]``, ``w2`` viewed ``[E, F, D]`` then transposed), the
expert bias is dropped, and the metadata keys and tokenizer fields are the converter's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
import unicodedata
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from safetensors.torch import load_file
from tokenizers import Tokenizer

from pipeline import Embedder
from pipeline.model import gguf as G
from pipeline.model.builder import REAL_CONFIG, random_hub_state, sample_texts
from pipeline.model.checkpoint import FP32_PARAMS, FP32_STREAM_PARAMS, encoder_from_state, key_map, load_encoder
from pipeline.model.config import EncoderConfig, load_config
from pipeline.model.sources import (ModelSourceError, describe_source, resolve_model,
                                    source_kind, weights_fingerprint)
from pipeline.tokenize import TextTokenizer
from tests.test_sources import COMMIT, _FakeHub, fake_hub, model_files  # noqa: F401

ARCH = "nomic-bert-moe"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5


# --- a GGUF writer in llama.cpp's layout ------------------------------------------------------


@dataclasses.dataclass
class Spec:
    """What a GGUF file holds, before it is written: tests change it to make bad files."""

    arch: str
    meta: dict[str, tuple[Any, V, V | None]]  # key -> (value, type, array element type)
    tensors: dict[str, tuple[np.ndarray, Q | None]]  # name -> (data, raw type or None)

    def write(self, path: Path) -> Path:
        writer = gguf.GGUFWriter(str(path), arch=self.arch)
        for key, (value, vtype, sub) in self.meta.items():
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for name, (data, qtype) in self.tensors.items():
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path


def llama_cpp_tensors(state: dict[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, np.ndarray]:
    """The hub state as llama.cpp's converter lays it out, float32, under GGUF names."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.NOMIC_BERT_MOE, cfg.num_layers)
    E, F, D = cfg.num_experts, cfg.ffn_size, cfg.hidden_size
    out = {}
    for key, tensor in state.items():
        if key.endswith("mlp.experts.bias"):
            continue  # the converter skips it
        array = tensor.float().numpy()
        if key.endswith(("mlp.experts.mlp.w1", "mlp.experts.mlp.w2")):
            array = array.reshape(E, F, D)
            if key.endswith("w2"):
                array = array.transpose(0, 2, 1)
            key += ".weight"
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, key
        out[name] = np.ascontiguousarray(array)
    return out


def keeps_f32(name: str, array: np.ndarray) -> bool:
    """Tensors llama.cpp keeps in F32 whatever the file type: 1-D ones, the router, token types."""
    return array.ndim == 1 or name.startswith("token_types") or "ffn_gate_inp" in name


# The fp16 scale fields of each K-quant block (byte offsets), and a scale that keeps the
# dequantized values of random blocks small (|w| <~ 0.3).
K_SCALES = {Q.Q2_K: ((80, 82), 5e-3), Q.Q3_K: ((108,), 2e-3), Q.Q4_K: ((0, 2), 3e-4),
            Q.Q5_K: ((0, 2), 1.5e-4), Q.Q6_K: ((208,), 8e-5)}


def random_blocks(shape: tuple[int, ...], qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks of a K-quant type (gguf-py cannot quantize to them): random bits,
    finite positive fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
    offsets, scale = K_SCALES[qtype]
    for off in offsets:
        d = (scale * rng.uniform(0.5, 1.0, blocks.shape[:-1])).astype(np.float16)
        blocks[..., off:off + 2] = d.view(np.uint8).reshape(*d.shape, 2)
    return blocks.reshape(*shape[:-1], -1)


def encode_tensor(name: str, array: np.ndarray, qtype: Q, rng) -> tuple[np.ndarray, Q | None]:
    if keeps_f32(name, array) or qtype == Q.F32:
        return array.astype(np.float32), None
    if qtype == Q.F16:
        return array.astype(np.float16), None
    if qtype in K_SCALES:
        return random_blocks(array.shape, qtype, rng), qtype
    return gguf.quants.quantize(array, qtype), qtype


def charsmap(mapping: dict[str, str]) -> bytes:
    """A SentencePiece ``precompiled_charsmap`` for ``{source: replacement}``: a darts-clone
    double array (a node's children at ``base ^ byte``, its value at ``base ^ 0``; bases
    first-fit and distinct), then the NUL-terminated replacements the values point into."""
    blob, trie = b"", {}
    for source, target in sorted(mapping.items()):
        node = trie
        for byte in source.encode():
            node = node.setdefault(byte, {})
        node[None] = len(blob)
        blob += target.encode() + b"\0"
    units: dict[int, int] = {}
    bases: set[int] = set()

    def place(node: dict, pos: int, label: int) -> None:
        slots = [0 if byte is None else byte for byte in node]
        base = next(b for b in range(1, 1 << 20) if b not in bases
                    and all(b ^ c not in units and b ^ c != 0 for c in slots))
        bases.add(base)
        units[pos] = ((pos ^ base) << 10) | ((None in node) << 8) | label
        for byte, child in node.items():
            units[base ^ (byte or 0)] = (child | 1 << 31) if byte is None else 0  # reserved
        for byte, child in node.items():
            if byte is not None:
                place(child, base ^ byte, byte)

    units[0] = 0
    place(trie, 0, 0)
    size = max(bases) | 0xFF  # every base ^ byte a reader may probe is inside (llama.cpp checks)
    array = struct.pack(f"<{size + 1}I", *(units.get(i, 0) for i in range(size + 1)))
    return struct.pack("<I", len(array)) + array + blob


@functools.cache
def nfkc_charsmap(texts: tuple[str, ...]) -> bytes:
    """NFKC, as SentencePiece compiles it, for the characters of ``texts``."""
    chars = {c for t in texts for c in t}
    return charsmap({c: unicodedata.normalize("NFKC", c) for c in chars
                     if unicodedata.normalize("NFKC", c) != c})


def tokenizer_meta(tokenizer_json: str, rows: int, chars: bytes) -> dict[str, tuple]:
    """``tokenizer.ggml.*`` as llama.cpp's converter writes an XLM-R tokenizer: the token list
    padded with UNUSED ``[PADi]`` up to the embedding rows, special ids, the charsmap."""
    tok = json.loads(tokenizer_json)
    tokens = [f"[PAD{i}]" for i in range(rows)]
    scores, types = [-10000.0] * rows, [UNUSED] * rows
    for i, (piece, score) in enumerate(tok["model"]["vocab"]):
        tokens[i], scores[i], types[i] = piece, score, NORMAL
    for added in tok["added_tokens"]:
        i = added["id"]
        tokens[i], scores[i] = added["content"], 0.0
        types[i] = CONTROL if added["special"] else USER_DEFINED
    ids = {t: tokens.index(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")}
    for special in ("<s>", "<pad>", "</s>", "<mask>"):
        types[ids[special]] = CONTROL  # transformers' all_special_ids
    types[ids["<unk>"]] = UNKNOWN
    u32, b = V.UINT32, V.BOOL
    return {
        "tokenizer.ggml.model": ("t5", V.STRING, None),
        "tokenizer.ggml.pre": ("default", V.STRING, None),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.scores": (scores, V.ARRAY, V.FLOAT32),
        "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
        "tokenizer.ggml.add_space_prefix": (True, b, None),
        "tokenizer.ggml.token_type_count": (1, u32, None),
        "tokenizer.ggml.remove_extra_whitespaces": (True, b, None),
        "tokenizer.ggml.bos_token_id": (ids["<s>"], u32, None),
        "tokenizer.ggml.eos_token_id": (ids["</s>"], u32, None),
        "tokenizer.ggml.unknown_token_id": (ids["<unk>"], u32, None),
        "tokenizer.ggml.seperator_token_id": (ids["</s>"], u32, None),
        "tokenizer.ggml.padding_token_id": (ids["<pad>"], u32, None),
        "tokenizer.ggml.cls_token_id": (ids["<s>"], u32, None),
        "tokenizer.ggml.mask_token_id": (ids["<mask>"], u32, None),
        "tokenizer.ggml.add_bos_token": (True, b, None),
        "tokenizer.ggml.add_eos_token": (True, b, None),
    } | ({"tokenizer.ggml.precompiled_charsmap": (chars, V.ARRAY, V.UINT8)} if chars else {})


def llama_cpp_spec(state: dict[str, torch.Tensor], cfg: EncoderConfig, tokenizer_json: str,
                   types: Q | dict[str, Q] = Q.F32, seed: int = 0,
                   chars: bytes | None = None) -> Spec:
    """A GGUF of ``state`` in llama.cpp's layout; ``types`` is one type for every tensor that
    is not kept in F32, or a type per tensor name (default F32). ``chars`` is the charsmap
    (default: NFKC for the test texts' characters; empty: none)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, array in llama_cpp_tensors(state, cfg).items():
        qtype = types.get(name, Q.F32) if isinstance(types, dict) else types
        tensors[name] = encode_tensor(name, array, qtype, rng)
    u32, f32 = V.UINT32, V.FLOAT32
    meta = {
        "general.name": ("nomic-embed-text-v2-moe-test", V.STRING, None),
        f"{ARCH}.block_count": (cfg.num_layers, u32, None),
        f"{ARCH}.context_length": (512, u32, None),
        f"{ARCH}.embedding_length": (cfg.hidden_size, u32, None),
        f"{ARCH}.feed_forward_length": (cfg.ffn_size, u32, None),
        f"{ARCH}.attention.head_count": (cfg.num_heads, u32, None),
        f"{ARCH}.attention.layer_norm_epsilon": (cfg.layer_norm_eps, f32, None),
        f"{ARCH}.expert_count": (cfg.num_experts, u32, None),
        f"{ARCH}.expert_used_count": (cfg.top_k, u32, None),
        f"{ARCH}.moe_every_n_layers": (cfg.moe_every, u32, None),
        f"{ARCH}.attention.causal": (False, V.BOOL, None),
        f"{ARCH}.pooling_type": (1, u32, None),
        "general.file_type": (0, u32, None),
    }
    chars = nfkc_charsmap(tuple(TEXTS)) if chars is None else chars
    meta |= tokenizer_meta(tokenizer_json, cfg.vocab_size, chars)
    return Spec(ARCH, meta, tensors)


# --- fixtures and helpers --------------------------------------------------------------------

# Texts whose tokens exercise the charsmap (full-width, ligature, circled digit, Thai sara am),
# runs of spaces and the XLM-R specials, beside the bundled multilingual sample.
EXTRA_TEXTS = ["Ｆｕｌｌ－ｗｉｄｔｈ ｔｅｘｔ，ｐｌｅａｓｅ", "the ﬁrst ﬂoor ① ② ③",
               "many   spaces    here", "ภาษาไทยสำหรับการทดสอบ", "café Ωmega Ⅻ ㎏",
               "<s> and </s> and <mask> in a text"]
TEXTS = sample_texts() + EXTRA_TEXTS
TOL = 1e-5  # fp32, same weights: only summation order differs


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model's config, hub state (fp32 tensors) and tokenizer.json."""
    cfg = load_config(tiny_model_dir)
    return cfg, load_file(str(tiny_model_dir / "model.safetensors")), \
        (tiny_model_dir / "tokenizer.json").read_text()


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def write_gguf(path: Path, state, cfg, tokenizer_json, types=Q.F32, **kw) -> Path:
    return llama_cpp_spec(state, cfg, tokenizer_json, types, **kw).write(path)


def resolve(path, cache, **kw):
    """``resolve_model``, checking that a zero expert bias, and only it, is warned about."""
    if kw.get("gguf_expert_bias", "zero") == "zero":
        with pytest.warns(G.GGUFExpertBiasWarning, match="using zero, as llama.cpp does"):
            return resolve_model(path, cache_dir=cache, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", G.GGUFExpertBiasWarning)
        return resolve_model(path, cache_dir=cache, **kw)


def untranspose(gguf_name: str, array: np.ndarray, cfg: EncoderConfig) -> np.ndarray:
    """A GGUF tensor (numpy order) back in the hub's layout, as model-spec section 2 defines it."""
    if gguf_name.endswith("ffn_down_exps.weight"):
        array = array.transpose(0, 2, 1)
    if gguf_name.endswith(("ffn_down_exps.weight", "ffn_up_exps.weight")):
        array = array.reshape(cfg.num_experts * cfg.ffn_size, cfg.hidden_size)
    return array


def reference_state(spec: Spec, state, cfg) -> dict[str, torch.Tensor]:
    """The hub state the GGUF of ``spec`` holds, dequantized by gguf-py, bias zero."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.NOMIC_BERT_MOE, cfg.num_layers)
    out = {}
    for key in state:
        if key.endswith("mlp.experts.bias"):
            out[key] = torch.zeros(cfg.hidden_size)
            continue
        suffix = ".weight" if key.endswith(("w1", "w2")) else ""
        name = names.get_name(key + suffix, try_suffixes=(".weight", ".bias"))
        data, qtype = spec.tensors[name]
        values = data.astype(np.float32) if qtype is None else \
            gguf.quants.dequantize(data, qtype)
        out[key] = torch.from_numpy(np.ascontiguousarray(untranspose(name, values, cfg)))
    return out


def encoder_on(state, cfg):
    """Our encoder on hub-named ``state`` (no files), fp32."""
    return encoder_from_state(cfg, {o: t(state[h]).float().contiguous()
                                    for o, h, _, t in key_map(cfg)})


def embedder_on(state, cfg, tokenizer_json) -> Embedder:
    return Embedder(encoder_on(state, cfg), TextTokenizer.from_json(tokenizer_json))


def assert_embeddings_close(a: Embedder, b: Embedder, tol=TOL) -> None:
    dims = (a.hidden_size, a.hidden_size // 2)
    got, want = a.encode(TEXTS, dims=dims), b.encode(TEXTS, dims=dims)
    for d in dims:
        assert np.abs(got[d] - want[d]).max() < tol, d


# --- layout ------------------------------------------------------------------------------------


def test_key_map_is_llama_cpp_s_layout_at_real_size():
    rows = G.gguf_key_map(REAL_CONFIG)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.NOMIC_BERT_MOE, REAL_CONFIG.num_layers)
    for hub, name, _, _ in rows:
        suffix = ".weight" if hub.endswith(("w1", "w2")) else ""
        theirs = names.get_name(hub + suffix, try_suffixes=(".weight", ".bias"))
        assert name == theirs, hub  # gguf-py's own name table (llama.cpp's), bias: None in both
    # GGUF lists dimensions innermost first; the issue's [768, 3072, 8] and [3072, 768, 8].
    gguf_dims = {name: list(reversed(shape)) for _, name, shape, _ in rows if name}
    assert gguf_dims["blk.1.ffn_up_exps.weight"] == [768, 3072, 8]
    assert gguf_dims["blk.1.ffn_down_exps.weight"] == [3072, 768, 8]
    assert gguf_dims["blk.1.ffn_gate_inp.weight"] == [768, 8]
    assert gguf_dims["token_embd.weight"] == [768, 250048]
    assert len(G.expert_bias_keys(REAL_CONFIG)) == 6 and len(gguf_dims) == 148 - 6


# --- weights, per type -------------------------------------------------------------------------


def test_f32_file_holds_the_safetensors_weights_exactly(tiny, tmp_path, cache, tiny_model_dir):
    cfg, state, tok = tiny
    path = write_gguf(tmp_path / "tiny.f32.gguf", state, cfg, tok)
    resolved = resolve(path, cache)
    got = load_file(str(resolved.local_dir / "model.safetensors"))
    assert set(got) == set(state)
    for key, want in state.items():
        if key.endswith("mlp.experts.bias"):
            assert torch.equal(got[key], torch.zeros_like(want)), key
        else:
            assert got[key].dtype == torch.float32 and torch.equal(got[key], want), key
    assert load_config(resolved.local_dir) == dataclasses.replace(cfg, max_positions=512)
    assert resolved.describe()["gguf"] == {
        "sha256": G._sha256(path), "quant_types": {"F32": len(state) - 2}, "expert_bias": "zero"}
    assert weights_fingerprint(resolved.local_dir) == \
        f"sha256:{G._sha256(path)}+expert_bias:zero"


# Each type's error budget against the original weights (bias zero in both): the minimum
# cosine of the tiny model's embeddings over TEXTS (measured: 0.9999996, 0.99998, 0.99986,
# 0.987, 0.989, 0.964, 0.932).
BUDGET = {Q.F16: 0.99999, Q.BF16: 0.9999, Q.Q8_0: 0.9995, Q.Q5_1: 0.98, Q.Q5_0: 0.98,
          Q.Q4_1: 0.95, Q.Q4_0: 0.9}


@pytest.mark.parametrize("qtype", list(BUDGET), ids=lambda q: q.name)
def test_each_type_loads_its_dequantized_weights(qtype, tiny, tmp_path, cache):
    cfg, state, tok = tiny
    spec = llama_cpp_spec(state, cfg, tok, qtype)
    resolved = resolve(spec.write(tmp_path / f"tiny.{qtype.name}.gguf"), cache)
    want = reference_state(spec, state, cfg)
    got = load_file(str(resolved.local_dir / "model.safetensors"))
    for key in state:
        assert torch.equal(got[key].float(), want[key]), key
    assert resolved.describe()["gguf"]["quant_types"] == {"F32": 33, qtype.name: 17}
    stored = {Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(qtype, torch.float32)
    assert got["encoder.layers.0.attn.Wqkv.weight"].dtype == stored  # exact, no fp32 copy
    gguf_model = Embedder.from_pretrained(resolved.local_dir, device="cpu", dtype="float32")
    assert_embeddings_close(gguf_model, embedder_on(want, cfg, tok))
    no_bias = {k: torch.zeros_like(v) if k.endswith("experts.bias") else v
               for k, v in state.items()}
    got = gguf_model.encode(TEXTS, dims=(64,))[64]
    original = embedder_on(no_bias, cfg, tok).encode(TEXTS, dims=(64,))[64]
    assert (got * original).sum(1).min() > BUDGET[qtype]


KQUANT_CONFIG = EncoderConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4,
                              ffn_size=256, num_experts=4, top_k=2)
# A K-quant file's mix: every tensor picks its own type (the file's name says Q4_K_M).
MIXED = {"token_embd.weight": Q.Q6_K, "attn_qkv.weight": Q.Q4_K, "attn_output.weight": Q.Q5_K,
         "ffn_up.weight": Q.Q3_K, "ffn_down.weight": Q.Q2_K, "ffn_up_exps.weight": Q.Q4_K,
         "ffn_down_exps.weight": Q.Q6_K}


def test_mixed_k_quant_file_dequantizes_each_tensor_by_its_own_type(tiny, tmp_path, cache):
    cfg, _, tok = tiny
    cfg = KQUANT_CONFIG
    state = random_hub_state(cfg, seed=3)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.NOMIC_BERT_MOE, cfg.num_layers)
    gguf_names = [names.get_name(k + (".weight" if k.endswith(("w1", "w2")) else ""),
                                 try_suffixes=(".weight", ".bias")) for k in state]
    types = {n: MIXED[n.split(".", 2)[-1] if n.startswith("blk.") else n]
             for n in gguf_names if n and (n.split(".", 2)[-1] in MIXED or n in MIXED)}
    types["blk.2.attn_qkv.weight"], types["blk.2.ffn_up.weight"] = Q.Q8_0, Q.Q4_1
    spec = llama_cpp_spec(state, cfg, tok, types)
    spec.meta["general.file_type"] = (15, V.UINT32, None)  # MOSTLY_Q4_K_M, not used
    resolved = resolve(spec.write(tmp_path / "model.Q4_K_M.gguf"), cache)
    written = Counter((q or Q.F32).name for _, q in spec.tensors.values())
    assert len(written) == 8 and resolved.describe()["gguf"]["quant_types"] == written
    want = reference_state(spec, state, cfg)
    got = load_file(str(resolved.local_dir / "model.safetensors"))
    for key in state:
        assert torch.equal(got[key], want[key]), key
    gguf_model = Embedder.from_pretrained(resolved.local_dir, device="cpu", dtype="float32")
    assert_embeddings_close(gguf_model, embedder_on(want, cfg, tok))


def test_bfloat16_compute_holds_no_fp32_copy(tiny, tmp_path, cache):
    cfg, state, tok = tiny
    resolved = resolve(write_gguf(tmp_path / "tiny.bf16.gguf", state, cfg, tok, Q.BF16), cache)
    model = Embedder.from_pretrained(resolved.local_dir, device="cpu", dtype="bfloat16")
    dtypes = {n: p.dtype for n, p in model.encoder.named_parameters()}
    # The matmul weights in bf16 only; fp32 only the router (model-spec 6) and the small
    # vectors the fp32 residual stream meets (norms, the token-type row).
    fp32 = FP32_PARAMS + FP32_STREAM_PARAMS  # on the CPU
    assert {n for n, d in dtypes.items() if d == torch.float32} == {
        n for n in dtypes if n.endswith(fp32)}
    assert {d for n, d in dtypes.items() if not n.endswith(fp32)} == {torch.bfloat16}
    assert any("router" in n for n in dtypes if n.endswith(FP32_PARAMS))


def test_token_types_squeezed_to_1d_as_llama_quantize_writes_it(tiny, tmp_path, cache):
    cfg, state, tok = tiny
    spec = llama_cpp_spec(state, cfg, tok)
    data, qtype = spec.tensors["token_types.weight"]
    spec.tensors["token_types.weight"] = (data.reshape(-1), qtype)  # ggml drops [D, 1]'s 1
    resolved = resolve(spec.write(tmp_path / "tiny.gguf"), cache)
    got = load_file(str(resolved.local_dir / "model.safetensors"))
    assert torch.equal(got["embeddings.token_type_embeddings.weight"],
                       state["embeddings.token_type_embeddings.weight"])


# --- the expert bias -----------------------------------------------------------------------------


def test_sidecar_restores_the_hub_reference_and_zero_is_llama_cpp_s_function(
        parity_fixture_dir, tiny, tmp_path, cache):
    cfg = load_config(parity_fixture_dir)
    state = load_file(str(parity_fixture_dir / "model.safetensors"))
    path = write_gguf(tmp_path / "parity.f32.gguf", state, cfg, tiny[2])
    sidecar = G.write_expert_bias(parity_fixture_dir, tmp_path / "bias.safetensors")
    inputs = json.loads((parity_fixture_dir / "inputs.json").read_text())
    ids, mask = torch.tensor(inputs["input_ids"]), torch.tensor(inputs["attention_mask"])
    expected = load_file(str(parity_fixture_dir / "expected.safetensors"))

    def pooled(encoder):
        with torch.no_grad():
            hidden = encoder(ids, mask)
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    restored = resolve(path, cache, gguf_expert_bias=str(sidecar))
    assert (pooled(load_encoder(restored.local_dir)) - expected["pooled"]).abs().max() < TOL
    assert restored.describe()["gguf"]["expert_bias"] == "sha256:" + G._sha256(sidecar)
    zero = resolve(path, cache)
    assert zero.local_dir != restored.local_dir
    assert weights_fingerprint(zero.local_dir) != weights_fingerprint(restored.local_dir)
    no_bias = {k: torch.zeros_like(v) if k.endswith("experts.bias") else v
               for k, v in state.items()}
    got = pooled(load_encoder(zero.local_dir))
    assert (got - pooled(encoder_on(no_bias, cfg))).abs().max() < TOL
    cos = torch.nn.functional.cosine_similarity(got, expected["pooled"]).min()
    assert cos < 0.999  # zeroing the bias is a visible change (measured: docs/gguf.md)


def test_sidecar_is_checked_key_by_key(parity_fixture_dir, tiny, tmp_path, cache):
    cfg = load_config(parity_fixture_dir)
    state = load_file(str(parity_fixture_dir / "model.safetensors"))
    path = write_gguf(tmp_path / "parity.f32.gguf", state, cfg, tiny[2])
    from safetensors.numpy import save_file
    save_file({"encoder.layers.1.mlp.experts.bias": np.zeros(64, np.float32)},
              str(tmp_path / "short.safetensors"))
    with pytest.raises(G.GGUFError, match=r"needs exactly \['encoder.layers.1.mlp.experts.bias', "
                                          r"'encoder.layers.3.mlp.experts.bias'\]"):
        resolve_model(path, cache_dir=cache, gguf_expert_bias=str(tmp_path / "short.safetensors"))
    save_file({f"encoder.layers.{i}.mlp.experts.bias": np.zeros(32, np.float32) for i in (1, 3)},
              str(tmp_path / "narrow.safetensors"))
    with pytest.raises(G.GGUFError, match=r"'encoder.layers.1.mlp.experts.bias' is float32 "
                                          r"\[32\], expected finite float \[64\]"):
        resolve_model(path, cache_dir=cache, gguf_expert_bias=str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ModelSourceError, match="applies to .gguf model files only"):
        resolve_model(parity_fixture_dir, gguf_expert_bias=str(tmp_path / "short.safetensors"))


def test_a_converted_dir_takes_the_sidecar_it_was_converted_with(parity_fixture_dir, tiny,
                                                                 tmp_path, cache):
    # What a local GGUF's workers get from the driver: the converted directory, and the option.
    cfg = load_config(parity_fixture_dir)
    state = load_file(str(parity_fixture_dir / "model.safetensors"))
    path = write_gguf(tmp_path / "parity.f32.gguf", state, cfg, tiny[2])
    sidecar = str(G.write_expert_bias(parity_fixture_dir, tmp_path / "bias.safetensors"))
    converted = resolve(path, cache, gguf_expert_bias=sidecar).local_dir
    assert resolve_model(converted, gguf_expert_bias=sidecar).local_dir == converted
    zero = resolve(path, cache).local_dir
    with pytest.raises(ModelSourceError, match="was converted with expert bias zero, not"):
        resolve_model(zero, gguf_expert_bias=sidecar)


# --- the tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("charsmap_type", [V.UINT8, V.INT32], ids=lambda v: v.name)
def test_tokenizer_rebuilt_from_metadata_gives_the_hub_ids(charsmap_type, tiny, tmp_path, cache,
                                                           tiny_model_dir):
    cfg, state, tok = tiny
    spec = llama_cpp_spec(state, cfg, tok)
    chars, _, _ = spec.meta["tokenizer.ggml.precompiled_charsmap"]
    values = list(chars) if charsmap_type == V.INT32 else chars
    spec.meta["tokenizer.ggml.precompiled_charsmap"] = (values, V.ARRAY, charsmap_type)
    resolved = resolve(spec.write(tmp_path / "tiny.gguf"), cache)
    rebuilt = TextTokenizer.from_dir(resolved.local_dir)  # also checks the XLM-R special ids
    hub = TextTokenizer.from_dir(tiny_model_dir)
    plain = [t for t in TEXTS if "<s>" not in t]
    want, got = hub.encode(plain), rebuilt.encode(plain)
    assert np.array_equal(got.lengths, want.lengths) and np.array_equal(got.ids, want.ids)
    # XLM-R's tokenizer.json lists all its control tokens as special added tokens (the tiny
    # one only <mask>): with them, the texts that spell them out agree too.
    xlmr = Tokenizer.from_str(tok)
    xlmr.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"])
    want, got = TextTokenizer(xlmr).encode(TEXTS), rebuilt.encode(TEXTS)
    assert np.array_equal(got.lengths, want.lengths) and np.array_equal(got.ids, want.ids)
    long = " ".join(TEXTS)  # truncation to 512 keeps </s>, as the hub tokenizer does
    assert rebuilt.encode([long]).sequence(0).tolist() == hub.encode([long]).sequence(0).tolist()
    assert rebuilt.vocab_size == hub.vocab_size  # the [PADi] rows are not tokens


def test_tokenizer_without_charsmap_does_not_normalize(tiny, tmp_path, cache):
    cfg, state, tok = tiny
    path = llama_cpp_spec(state, cfg, tok, chars=b"").write(tmp_path / "tiny.gguf")
    rebuilt = TextTokenizer.from_dir(resolve(path, cache).local_dir)
    with_map = TextTokenizer.from_dir(resolve(write_gguf(
        tmp_path / "map.gguf", state, cfg, tok), cache).local_dir)
    text = ["Ｆｕｌｌ－ｗｉｄｔｈ"]  # what the charsmap maps, and nothing else does
    assert rebuilt.encode(text).ids.tolist() != with_map.encode(text).ids.tolist()


# --- bad files ---------------------------------------------------------------------------------


def _drop(name):
    return lambda spec: spec.tensors.pop(name)


def _set(key, value, vtype, sub=None):
    return lambda spec: spec.meta.__setitem__(key, (value, vtype, sub))


def _transposed_down_exps(spec):
    data, qtype = spec.tensors["blk.1.ffn_down_exps.weight"]
    spec.tensors["blk.1.ffn_down_exps.weight"] = (np.ascontiguousarray(
        data.transpose(0, 2, 1)), qtype)


def _nan(spec):
    data, qtype = spec.tensors["blk.2.attn_output.weight"]
    data = data.copy()
    data[3, 5] = np.nan
    spec.tensors["blk.2.attn_output.weight"] = (data, qtype)


def _iq4(spec):
    data, _ = spec.tensors["blk.0.ffn_up.weight"]  # [128, 64]: 2 blocks of 32 per row
    spec.tensors["blk.0.ffn_up.weight"] = (np.zeros((128, 36), np.uint8), Q.IQ4_NL)


BAD = {
    "missing tensor": (_drop("blk.1.ffn_up_exps.weight"),
                       r"tensor 'blk.1.ffn_up_exps.weight' is missing"),
    "wrong shape": (_transposed_down_exps, r"tensor 'blk.1.ffn_down_exps.weight' has shape "
                    r"\[64, 128, 4\], expected \[128, 64, 4\] \(GGUF order"),
    "unexpected tensor": (lambda s: s.tensors.__setitem__(
        "output_norm.weight", (np.ones(64, np.float32), None)),
        r"tensor 'output_norm.weight' is not part of this model"),
    "unknown quant type": (_iq4, r"tensor 'blk.0.ffn_up.weight' has type IQ4_NL, which this "
                           r"reader does not dequantize \(supported: F32, F16, BF16, Q8_0"),
    "non-finite": (_nan, r"tensor 'blk.2.attn_output.weight' holds non-finite values"),
    "another architecture": (lambda s: setattr(s, "arch", "bert"),
                             r"'general.architecture' is 'bert'; this encoder reads "
                             r"'nomic-bert-moe' files"),
    "missing key": (lambda s: s.meta.pop(f"{ARCH}.block_count"),
                    rf"metadata key '{ARCH}.block_count' is missing"),
    "mistyped key": (_set(f"{ARCH}.attention.head_count", "4", V.STRING),
                     rf"metadata key '{ARCH}.attention.head_count' has type STRING, "
                     r"expected int"),
    "zero heads": (_set(f"{ARCH}.attention.head_count", 0, V.UINT32),
                   rf"'{ARCH}.attention.head_count' is 0, expected a positive integer"),
    "indivisible heads": (_set(f"{ARCH}.attention.head_count", 5, V.UINT32),
                          "does not implement: hidden size 64 is not divisible by 5 heads"),
    "top-k over experts": (_set(f"{ARCH}.expert_used_count", 5, V.UINT32),
                           r"top_k 5 must be in \[1, num_experts=4\]"),
    "cls pooling": (_set(f"{ARCH}.pooling_type", 2, V.UINT32),
                    rf"'{ARCH}.pooling_type' is 2; this encoder computes only 1 "
                    r"\(1 = mean pooling"),
    "causal": (_set(f"{ARCH}.attention.causal", True, V.BOOL),
               rf"'{ARCH}.attention.causal' is True; this encoder computes only False"),
    "unknown key": (_set(f"{ARCH}.rope.scaling.factor", 2.0, V.FLOAT32),
                    rf"metadata keys \['{ARCH}.rope.scaling.factor'\] are not known"),
    "bpe tokenizer": (_set("tokenizer.ggml.model", "gpt2", V.STRING),
                      r"'tokenizer.ggml.model' is 'gpt2'; XLM-R's SentencePiece"),
    "short scores": (_set("tokenizer.ggml.scores", [0.0] * 10, V.ARRAY, V.FLOAT32),
                     r"have 1024, 10, 1024 entries"),
    "charsmap of ints": (_set("tokenizer.ggml.precompiled_charsmap", [1, 300], V.ARRAY,
                              V.INT32), r"'tokenizer.ggml.precompiled_charsmap' holds values "
                         r"outside 0..255"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_name_the_tensor_or_key(case, tiny, tmp_path, cache):
    cfg, state, tok = tiny
    spec = llama_cpp_spec(state, cfg, tok)
    change, message = BAD[case]
    change(spec)
    path = spec.write(tmp_path / "bad.gguf")
    with pytest.raises(G.GGUFError, match=message) as err:
        resolve_model(path, cache_dir=cache)
    assert str(err.value).startswith(str(path))
    assert not list((cache / "gguf").glob("*/config.json"))  # nothing half-converted is kept


@pytest.mark.parametrize("keep", [0.5, 0.9999, 0.01])
def test_truncated_file_is_a_clear_error(keep, tiny, tmp_path, cache):
    cfg, state, tok = tiny
    path = write_gguf(tmp_path / "whole.gguf", state, cfg, tok)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    message = ("file is truncated: tensor '.*' needs bytes up to" if keep > 0.1
               else "not a readable GGUF file")
    with pytest.raises(G.GGUFError, match=message):
        resolve_model(path, cache_dir=cache)


def test_rope_base_defaults_to_10000_and_is_read_when_present(tiny, tmp_path, cache):
    cfg, state, tok = tiny
    assert f"{ARCH}.rope.freq_base" not in llama_cpp_spec(state, cfg, tok).meta  # as llama.cpp
    spec = llama_cpp_spec(state, cfg, tok)
    spec.meta[f"{ARCH}.rope.freq_base"] = (20000.0, V.FLOAT32, None)
    default = load_config(resolve(write_gguf(tmp_path / "a.gguf", state, cfg, tok),
                                  cache).local_dir)
    given = load_config(resolve(spec.write(tmp_path / "b.gguf"), cache).local_dir)
    assert (default.rotary_base, given.rotary_base) == (10000.0, 20000.0)


# --- sources -------------------------------------------------------------------------------------


def test_local_file_is_converted_once_per_content(tiny, tmp_path, cache):
    cfg, state, tok = tiny
    path = write_gguf(tmp_path / "tiny.gguf", state, cfg, tok, Q.Q8_0)
    first = resolve(path, cache)
    stamp = (first.local_dir / "model.safetensors").stat().st_mtime_ns
    again = resolve(path, cache)
    assert again.local_dir == first.local_dir and \
        (again.local_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert (first.model_id, first.kind, first.revision) == (str(path), "local", None)
    assert describe_source(path) == {"model_id": str(path), "revision": None, "kind": "local"}
    write_gguf(path, state, cfg, tok, Q.Q4_0)  # new content, same name: converted again
    changed = resolve(path, cache)
    assert changed.local_dir != first.local_dir
    assert changed.describe()["gguf"]["quant_types"] == {"F32": 33, "Q4_0": 17}


def test_fsspec_file_is_downloaded_and_converted(tiny, tmp_path, cache):
    cfg, state, tok = tiny
    path = write_gguf(tmp_path / "tiny.gguf", state, cfg, tok, Q.F16)
    root = f"/gguf-{tmp_path.name}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{root}/m/tiny.gguf", path.read_bytes())
    try:
        remote = resolve(f"memory://{root}/m/tiny.gguf", cache)
        local = resolve(path, cache)
    finally:
        fs.rm(root, recursive=True)
    assert (remote.model_id, remote.kind) == (f"memory://{root}/m/tiny.gguf", "fsspec")
    assert weights_fingerprint(remote.local_dir) == weights_fingerprint(local.local_dir)
    with pytest.raises(ModelSourceError, match="no such bucket or prefix"):
        resolve_model(f"memory://{root}/m/tiny.gguf", cache_dir=cache)


@pytest.mark.parametrize("source, kind", [
    ("nomic-ai/nomic-embed-text-v2-moe-GGUF/nomic-embed-text-v2-moe.Q8_0.gguf", "hub"),
    ("org/name/sub/dir/Model-F16.GGUF", "hub"), ("s3://bucket/m.gguf", "fsspec"),
    ("./m.gguf", "local")])
def test_gguf_sources_by_kind(source, kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert source_kind(source) == kind


@pytest.mark.parametrize("bad", ["org/name/../x.gguf", "org/na--me/x.gguf", "org/x.gguf/",
                                 "org/name/a b.gguf"])
def test_malformed_hub_gguf_ids_are_refused(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match="GGUF file"):
        resolve_model(bad, cache_dir=tmp_path)


def test_hub_file_is_downloaded_by_commit(fake_hub, tiny, tmp_path, cache, monkeypatch):
    cfg, state, tok = tiny
    data = write_gguf(tmp_path / "tiny.gguf", state, cfg, tok, Q.Q8_0).read_bytes()
    monkeypatch.setattr(_FakeHub, "REPO", {"gguf/tiny.Q8_0.gguf": data})
    resolved = resolve("org/model/gguf/tiny.Q8_0.gguf", cache)
    assert (resolved.revision, resolved.kind) == (COMMIT, "hub")
    assert resolved.describe()["gguf"]["sha256"] == G._sha256(tmp_path / "tiny.gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hugging Face cache now serves it
    assert resolve("org/model/gguf/tiny.Q8_0.gguf", cache).local_dir == resolved.local_dir


# --- the command line ----------------------------------------------------------------------------


def test_convert_and_expert_bias_commands(parity_fixture_dir, tiny, tmp_path, capsys):
    cfg = load_config(parity_fixture_dir)
    state = load_file(str(parity_fixture_dir / "model.safetensors"))
    path = write_gguf(tmp_path / "parity.gguf", state, cfg, tiny[2])
    sidecar = tmp_path / "bias.safetensors"
    assert G.main(["expert-bias", "--model", str(parity_fixture_dir), "--out", str(sidecar)]) == 0
    assert G.main(["convert", str(path), "--out", str(tmp_path / "out"),
                   "--expert-bias", str(sidecar)]) == 0
    assert "1 F32 tensors" not in capsys.readouterr().out
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in state.items())  # F32 + sidecar: the hub's
    assert weights_fingerprint(tmp_path / "out") == \
        f"sha256:{G._sha256(path)}+expert_bias:sha256:{G._sha256(sidecar)}"
    assert G.main(["convert", str(path), "--out", str(tmp_path / "zero")]) == 0
    assert "using zero, as llama.cpp does" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        G.main(["convert", str(path), "--out", str(tmp_path / "out")])  # not empty


# --- a run ---------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_run_with_a_gguf_model(cluster, tiny, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.cli import main
    from pipeline.io.schema import read_metadata

    cfg, state, tok = tiny
    path = write_gguf(tmp_path / "tiny.Q8_0.gguf", state, cfg, tok, Q.Q8_0)
    monkeypatch.setenv("NOMIC_PIPELINE_CACHE", str(tmp_path / "cache"))
    texts = TEXTS[::6]
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), tmp_path / "in.parquet")
    with pytest.warns(G.GGUFExpertBiasWarning):
        code = main(["run", "--input", str(tmp_path / "in.parquet"), "--output",
                     str(tmp_path / "out"), "--model", str(path), "--dims", "64,32",
                     "--progress", "off"])
    assert code == 0
    table = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet")))
    with pytest.warns(G.GGUFExpertBiasWarning):
        model = Embedder.from_pretrained(path, device="cpu", dtype="float32")
    want = model.encode([texts[i] for i in table["id"].to_pylist()], dims=(64, 32))
    for d in (64, 32):
        got = np.stack(table[f"embedding_{d}"].to_numpy(zero_copy_only=False))
        assert np.abs(got - want[d]).max() < TOL
    meta = read_metadata(table.schema)
    assert meta["model_id"] == str(path)
    assert meta["weights_fingerprint"] == f"sha256:{G._sha256(path)}+expert_bias:zero"


# --- measurements (not a test): python3 -m tests.test_gguf --out DIR ------------------------------

# llama.cpp's file types (llama_ftype), quantized by llama.cpp itself from the F32 file.
LLAMA_FTYPES = {"Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q5_K_S": 16, "Q5_1": 9, "Q5_0": 8,
                "Q4_K_M": 15, "Q4_K_S": 14, "Q4_1": 3, "Q4_0": 2, "Q3_K_L": 13, "Q3_K_M": 12,
                "Q3_K_S": 11, "Q2_K": 10}


def measure(out: Path, size: str, n_texts: int, threads: int, only: list[str]) -> None:
    """Per file type, on random weights: our encoder on the GGUF (bias zero, and with the
    sidecar) against the hub model, llama.cpp against ours on the same file, tokens/s of both."""
    import ctypes
    import time

    import llama_cpp  # built from source by `pip install llama-cpp-python` (minutes)

    from pipeline.bench.workload import length_mix, texts_of_lengths
    from pipeline.model.builder import build_model_dir

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore", G.GGUFExpertBiasWarning)
    model_dir = out / f"model-{size}"
    if not (model_dir / "config.json").is_file():
        build_model_dir(model_dir, size)
    cfg, tok = load_config(model_dir), (model_dir / "tokenizer.json").read_text()
    hub = Embedder.from_pretrained(model_dir, device="cpu", dtype="float32")
    texts = texts_of_lengths(length_mix(n_texts), hub.tokenizer)
    D, tokens = cfg.hidden_size, int(hub.tokenize(texts).lengths.sum())
    ref = hub.encode(texts, dims=(D,))[D]
    sidecar = G.write_expert_bias(model_dir, out / "expert-bias.safetensors")
    state = load_file(str(model_dir / "model.safetensors"))
    files = {}
    for qtype in (Q.F32, Q.F16, Q.BF16):
        files[qtype.name] = out / f"{size}.{qtype.name}.gguf"
        if not files[qtype.name].is_file():
            llama_cpp_spec(state, cfg, tok, qtype).write(files[qtype.name])
    del state
    for name, ftype in LLAMA_FTYPES.items():
        files[name] = out / f"{size}.{name}.gguf"
        if not files[name].is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = ftype, threads
            assert llama_cpp.llama_model_quantize(str(files["F32"]).encode(), str(
                files[name]).encode(), ctypes.byref(params)) == 0, name
    print(f"{size}: {n_texts} texts, {tokens} tokens, {threads} threads; cosines: min (median)")
    print("file | MiB | types | convert s | ours zero vs hub | ours+sidecar vs hub | llama.cpp "
          "vs ours zero | ours f32 tok/s | ours bf16 tok/s | llama.cpp tok/s")
    for name, path in files.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        zero = resolve_model(path, cache_dir=out / "cache")
        convert_s = time.perf_counter() - start
        fixed = resolve_model(path, cache_dir=out / "cache", gguf_expert_bias=str(sidecar))
        e_fixed = Embedder.from_pretrained(fixed.local_dir, device="cpu", dtype="float32").encode(
            texts, dims=(D,))[D]
        (e_zero, f32_rate), (_, bf16_rate) = (
            _timed(Embedder.from_pretrained(zero.local_dir, device="cpu", dtype=dtype).encode,
                   texts, tokens, dims=(D,)) for dtype in ("float32", "bfloat16"))
        llm = llama_cpp.Llama(str(path), embedding=True, n_ctx=2048, n_batch=2048,
                              n_ubatch=2048, n_threads=threads, n_threads_batch=threads,
                              pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
        prefixed = ["search_document: " + t for t in texts]
        same = sum(llm.tokenize(t.encode()) == hub.tokenize([u]).sequence(0).tolist()
                   for t, u in zip(prefixed, texts))
        e_llama, llama_rate = _timed(lambda x: {D: np.array(llm.embed(x, normalize=True))},
                                     prefixed, tokens)
        del llm
        types = ", ".join(f"{n} {t}" for t, n in zero.describe()["gguf"]["quant_types"].items())
        cos = [(a * b).sum(1) for a, b in ((e_zero[D], ref), (e_fixed, ref),
                                           (e_llama[D], e_zero[D]))]
        print(f"{name} | {path.stat().st_size >> 20} | {types} | {convert_s:.1f} | " + " | ".join(
            f"{c.min():.6f} ({np.median(c):.6f})" for c in cos) +
            f" | {f32_rate:.0f} | {bf16_rate:.0f} | {llama_rate:.0f}"
            f"{'' if same == len(texts) else f' | tokens differ on {len(texts) - same} texts'}",
            flush=True)


def _timed(encode, texts, tokens, **kw):
    """``(encode(texts), tokens/s)``, after a warm-up call on a few texts."""
    import time

    encode(texts[:4], **kw)
    start = time.perf_counter()
    result = encode(texts, **kw)
    return result, tokens / (time.perf_counter() - start)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=measure.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="working directory (GBs)")
    parser.add_argument("--size", default="real", choices=["tiny", "real"])
    parser.add_argument("--texts", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="file types to measure, comma-separated")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    measure(args.out, args.size, args.texts, args.threads, [t for t in args.only.split(",") if t])
