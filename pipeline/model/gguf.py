"""GGUF files of nomic-embed-text-v2-moe (llama.cpp's format), made into hub-layout model dirs.

:func:`convert_gguf` reads a GGUF with gguf-py and writes the directory the rest of the
pipeline reads (``config.json``, ``model.safetensors``, ``tokenizer.json``), so the encoder, the
pre-flight, Ray workers and the weights fingerprint need nothing new. Each tensor is dequantized
by its own type (a K-quant file mixes several), mapped through :func:`gguf_key_map` (the
counterpart of the safetensors key map; the one relayout is ``ffn_down_exps``, which llama.cpp's
converter stored transposed) and checked: names, shapes, types, finite values. The config comes
from the ``nomic-bert-moe.*`` metadata through the same ``config_from_hub`` as a config.json;
the tokenizer is rebuilt from ``tokenizer.ggml.*`` as XLM-R's SentencePiece Unigram.

GGUF files lack the MoE expert output bias (llama.cpp's converter drops
``encoder.layers.{i}.mlp.experts.bias``; its graph has no place for it). Without it this
computes what llama.cpp computes; a sidecar of the hub checkpoint's vectors
(:func:`write_expert_bias`) restores the hub model's function up to quantization. docs/gguf.md
has the details and the measurements.

    python -m pipeline.model.gguf expert-bias --model DIR --out expert-bias.safetensors
    python -m pipeline.model.gguf convert model.Q8_0.gguf --out DIR [--expert-bias FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, quants
from safetensors import safe_open
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

from .checkpoint import CheckpointError, checkpoint_index, key_map, weight_files
from .config import (EncoderConfig, UnsupportedConfigError, config_from_hub, hub_config_dict,
                     load_config)

ARCH = "nomic-bert-moe"
MANIFEST = "_gguf.json"
# Bumped when the conversion changes what it writes: converted copies of older versions are
# redone (the cache key holds it) rather than reused.
CONVERTER_VERSION = 1
Q = GGMLQuantizationType
# The types llama.cpp's files of this model use (K-quant mixes fall back to Q5_0/Q5_1/Q8_0 for
# rows that are not a multiple of 256); others (IQ*, TQ*, MXFP4...) are refused, not guessed.
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# Stored as read (exact); every quantized type is dequantized to float32 (exact too: d * q).
_STORED = {Q.F32: ("F32", np.float32), Q.F16: ("F16", np.float16), Q.BF16: ("BF16", np.uint16)}
# llama.cpp's default when `rope.freq_base` is absent (its converter writes it only from a
# `rope_theta` field, which the hub config does not have); the hub's rotary_emb_base is 10000.
DEFAULT_ROPE_BASE = 10000.0
# The converter rewrites n_positions 2048 to 512 for this model ("trained for 512 tokens").
DEFAULT_CONTEXT = 512
# gguf.TokenType values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(1, 7)
_CHUNK_BYTES = 8 << 20  # dequantize in slices of the outer axis: bounded memory at real size


class GGUFError(CheckpointError):
    """A GGUF file that is unreadable or does not hold nomic-embed-text-v2-moe as we compute it."""


class GGUFExpertBiasWarning(UserWarning):
    """A GGUF model loaded without the MoE expert output bias: llama.cpp's function, not the hub's."""


# --- reading ---------------------------------------------------------------------------------


class _Reader(GGUFReader):
    """gguf-py's reader, with a tensor's unknown type or missing bytes named before it fails."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            name = bytes(name).decode("utf-8", "replace")
            try:
                qtype = Q(int(raw_type[0]))
            except ValueError:
                raise GGUFError(f"tensor {name!r} has unknown type id {int(raw_type[0])}") from None
            block, size = GGML_QUANT_SIZES[qtype]
            count = math.prod(int(d) for d in dims)
            if not len(dims) or int(dims[0]) % block:
                raise GGUFError(f"tensor {name!r} ({qtype.name}) has shape {dims.tolist()}, "
                                f"rows not a multiple of its {block}-value block")
            end = start_offs + int(offset[0]) + count // block * size
            if end > len(self.data):
                raise GGUFError(f"file is truncated: tensor {name!r} needs bytes up to {end}, "
                                f"the file has {len(self.data)}")
        super()._build_tensors(start_offs, fields)


def read_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """Open ``path`` (memory-mapped); a file that is not a readable GGUF is a :class:`GGUFError`."""
    try:
        reader = _Reader(path)
    except GGUFError:
        raise
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as err:
        raise GGUFError(f"not a readable GGUF file (truncated or corrupt?): "
                        f"{type(err).__name__}: {err}") from err
    if reader.byte_order != "I":
        raise GGUFError("a big-endian GGUF; only little-endian files are read")
    return reader


_INTS = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
         GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64}
_FLOATS = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}
_SCALAR_KINDS = {"int": _INTS, "float": _FLOATS | _INTS, "bool": {GGUFValueType.BOOL},
                 "str": {GGUFValueType.STRING}}
_ARRAY_KINDS = {"ints": _INTS, "floats": _FLOATS, "strs": {GGUFValueType.STRING}, "bytes": _INTS}
_REQUIRED = object()


class Metadata:
    """A GGUF file's key/value metadata, read with its type checked (errors name the key)."""

    def __init__(self, reader: GGUFReader) -> None:
        self.fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}

    def get(self, key: str, kind: str, default: Any = _REQUIRED) -> Any:
        """The value of ``key`` as ``kind``: int, float, bool, str, ints, floats, strs or bytes."""
        field = self.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise GGUFError(f"metadata key {key!r} is missing")
            return default
        types = list(field.types)
        array = types[0] == GGUFValueType.ARRAY
        if kind in _ARRAY_KINDS:
            ok = array and len(types) > 1 and types[1] in _ARRAY_KINDS[kind]
        else:
            ok = not array and types[0] in _SCALAR_KINDS[kind]
        if not ok:
            raise GGUFError(f"metadata key {key!r} has type {'/'.join(t.name for t in types)}, "
                            f"expected {kind}")
        if kind == "bytes":
            return _bytes_value(key, np.concatenate([field.parts[i] for i in field.data]))
        value = field.contents()
        if kind == "float" and types[0] == GGUFValueType.FLOAT32:
            # The shortest decimal that is this float32: 1e-5 stored as FLOAT32 reads back as
            # 9.99999974e-06; the writer meant (and the hub config says) 1e-05.
            return float(str(np.float32(value)))
        return float(value) if kind == "float" else value

    def positive(self, key: str, default: Any = _REQUIRED) -> int:
        value = self.get(key, "int", default)
        if value < 1:
            raise GGUFError(f"metadata key {key!r} is {value}, expected a positive integer")
        return value


def _bytes_value(key: str, values: np.ndarray) -> bytes:
    # gguf-py wrote a Python `bytes` as UINT8, but early converters passed a list of ints,
    # which it stored as one INT32 per byte: accepted when every value is a byte.
    if values.dtype == np.int8:
        return values.view(np.uint8).tobytes()
    if values.size and (values.min() < 0 or values.max() > 255):
        raise GGUFError(f"metadata key {key!r} holds values outside 0..255; expected bytes")
    return values.astype(np.uint8).tobytes()


# --- config ----------------------------------------------------------------------------------

# `nomic-bert-moe.<key>` -> the hub config.json field it is (config_from_hub maps and checks it).
_HUB_FIELDS = {
    "block_count": "n_layer", "embedding_length": "n_embd", "feed_forward_length": "n_inner",
    "attention.head_count": "n_head", "expert_count": "num_experts",
    "expert_used_count": "moe_top_k", "moe_every_n_layers": "moe_every_n_layers",
}
# Keys llama.cpp may write whose value is fixed by what this encoder computes.
_MUST_BE = {"attention.causal": False, "pooling_type": 1, "expert_shared_count": 0,
            "expert_gating_func": 1, "expert_weights_norm": False, "expert_weights_scale": 1.0,
            "rope.scaling.type": "none"}
# Keys that, when present, must agree with the shape the other keys and the tensors give.
_MUST_MATCH: dict[str, Callable[[EncoderConfig], int]] = {
    "attention.head_count_kv": lambda c: c.num_heads,
    "attention.key_length": lambda c: c.head_dim, "attention.value_length": lambda c: c.head_dim,
    "rope.dimension_count": lambda c: c.head_dim, "vocab_size": lambda c: c.vocab_size,
    "expert_feed_forward_length": lambda c: c.ffn_size,
}
_READ = set(_HUB_FIELDS) | {"attention.layer_norm_epsilon", "rope.freq_base", "context_length"}
KNOWN_ARCH_KEYS = frozenset(_READ | set(_MUST_BE) | set(_MUST_MATCH))
_MEANING = {"pooling_type": "1 = mean pooling, the model's own", "expert_gating_func": "1 = softmax"}


def config_from_gguf(meta: Metadata, shapes: dict[str, tuple[int, ...]]) -> EncoderConfig:
    """The :class:`EncoderConfig` of a GGUF: its metadata and the embedding tables' rows.

    ``shapes`` maps tensor names to numpy-order shapes (outer axis first).
    """
    arch = meta.get("general.architecture", "str")
    if arch != ARCH:
        raise GGUFError(f"metadata 'general.architecture' is {arch!r}; this encoder reads "
                        f"{ARCH!r} files (nomic-embed-text-v2-moe) only")
    prefix = ARCH + "."
    unknown = sorted(k for k in meta.fields if k.startswith(prefix)
                     and k[len(prefix):] not in KNOWN_ARCH_KEYS)
    if unknown:
        raise GGUFError(f"metadata keys {unknown} are not known to this encoder; refusing to "
                        "guess whether they change the model's function")
    for table, ndims in (("token_embd.weight", (2,)), ("token_types.weight", (1, 2))):
        if len(shapes.get(table, ())) not in ndims:  # 1: [1, D] as ggml writes it, [D]
            raise GGUFError(f"tensor {table!r} is missing or not 2-D "
                            f"(shape {list(shapes.get(table, ()))})")
    hub = {theirs: meta.positive(prefix + key) for key, theirs in _HUB_FIELDS.items()}
    ctx = meta.positive(prefix + "context_length", DEFAULT_CONTEXT)
    eps = meta.get(prefix + "attention.layer_norm_epsilon", "float")
    base = meta.get(prefix + "rope.freq_base", "float", DEFAULT_ROPE_BASE)
    for key, value in (("attention.layer_norm_epsilon", eps), ("rope.freq_base", base)):
        if not math.isfinite(value) or value <= 0:
            raise GGUFError(f"metadata key {prefix + key!r} is {value}, expected a positive number")
    hub |= {"layer_norm_epsilon": eps, "rotary_emb_base": base, "max_trained_positions": ctx,
            "n_positions": ctx, "vocab_size": shapes["token_embd.weight"][0],
            "type_vocab_size": (1, *shapes["token_types.weight"])[-2],
            "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", "int", 1)}
    try:
        cfg = config_from_hub(hub)
    except UnsupportedConfigError as err:
        raise GGUFError(f"the metadata describes a model this encoder does not implement: "
                        f"{err}") from None
    for key, want in _MUST_BE.items():
        kind = {bool: "bool", int: "int", float: "float", str: "str"}[type(want)]
        if (got := meta.get(prefix + key, kind, want)) != want:
            why = f" ({_MEANING[key]})" if key in _MEANING else ""
            raise GGUFError(f"metadata key {prefix + key!r} is {got!r}; this encoder computes "
                            f"only {want!r}{why}")
    for key, expected in _MUST_MATCH.items():
        if (got := meta.get(prefix + key, "int", expected(cfg))) != expected(cfg):
            raise GGUFError(f"metadata key {prefix + key!r} is {got}, but the model has "
                            f"{expected(cfg)}")
    count = meta.get("tokenizer.ggml.token_type_count", "int", cfg.type_vocab_size)
    if count != cfg.type_vocab_size:
        raise GGUFError(f"metadata key 'tokenizer.ggml.token_type_count' is {count}, but tensor "
                        f"'token_types.weight' has {cfg.type_vocab_size} rows")
    return cfg


# --- tensors ---------------------------------------------------------------------------------

Relayout = Callable[[np.ndarray], np.ndarray]


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _stack_experts(a: np.ndarray) -> np.ndarray:
    # [e, F, D] -> [e*F, D]: the hub's w1 with the expert axis outer.
    return a.reshape(-1, a.shape[-1])


def _untranspose_experts(a: np.ndarray) -> np.ndarray:
    # llama.cpp's converter stores w2 [E*F, D] as [E, D, F] (viewed [E, F, D], then transposed).
    return np.ascontiguousarray(a.transpose(0, 2, 1)).reshape(-1, a.shape[1])


# Hub key (after `encoder.layers.{i}.` for layer keys) -> GGUF tensor name (after `blk.{i}.`).
_GLOBAL_NAMES = {
    "embeddings.word_embeddings.weight": "token_embd.weight",
    "embeddings.token_type_embeddings.weight": "token_types.weight",
    "emb_ln.weight": "token_embd_norm.weight", "emb_ln.bias": "token_embd_norm.bias",
}
_LAYER_NAMES = {
    "attn.Wqkv.weight": "attn_qkv.weight", "attn.Wqkv.bias": "attn_qkv.bias",
    "attn.out_proj.weight": "attn_output.weight", "attn.out_proj.bias": "attn_output.bias",
    "norm1.weight": "attn_output_norm.weight", "norm1.bias": "attn_output_norm.bias",
    "norm2.weight": "layer_output_norm.weight", "norm2.bias": "layer_output_norm.bias",
    "mlp.fc1.weight": "ffn_up.weight", "mlp.fc1.bias": "ffn_up.bias",
    "mlp.fc2.weight": "ffn_down.weight", "mlp.fc2.bias": "ffn_down.bias",
    "mlp.router.layer.weight": "ffn_gate_inp.weight",
    "mlp.experts.mlp.w1": "ffn_up_exps.weight",
    "mlp.experts.mlp.w2": "ffn_down_exps.weight",
    "mlp.experts.bias": None,  # dropped by llama.cpp's converter: zero or the sidecar
}


def gguf_key_map(cfg: EncoderConfig) -> list[tuple[str, str | None, tuple[int, ...], Relayout]]:
    """``(hub key, GGUF tensor name, GGUF shape, GGUF -> hub layout)`` for every hub tensor.

    GGUF shapes are in numpy order (outer axis first; GGUF lists them innermost first). The
    name is None for the expert bias, which GGUF files do not hold.
    """
    E, F, D = cfg.num_experts, cfg.ffn_size, cfg.hidden_size
    rows = []
    for _, hub, shape, _ in key_map(cfg):
        if hub.startswith("encoder.layers."):
            i, rest = hub.removeprefix("encoder.layers.").split(".", 1)
            leaf = _LAYER_NAMES[rest]
            name = None if leaf is None else f"blk.{i}.{leaf}"
        else:
            name = _GLOBAL_NAMES[hub]
        relayout, gguf_shape = _same, shape
        if hub.endswith("mlp.experts.mlp.w1"):
            relayout, gguf_shape = _stack_experts, (E, F, D)
        elif hub.endswith("mlp.experts.mlp.w2"):
            relayout, gguf_shape = _untranspose_experts, (E, D, F)
        rows.append((hub, name, gguf_shape, relayout))
    return rows


def _ggml(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A numpy-order shape as ggml counts dimensions: outer axes of size 1 dropped (llama.cpp's
    quantizer writes ``token_types`` ``[D, 1]`` as ``[D]``)."""
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def check_tensors(reader: GGUFReader, cfg: EncoderConfig) -> dict[str, Any]:
    """Every tensor the key map needs present with its shape and a supported type, none other;
    returns the reader's tensors by name."""
    tensors = {t.name: t for t in reader.tensors}
    rows = gguf_key_map(cfg)
    wanted = {name: shape for _, name, shape, _ in rows if name is not None}
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise GGUFError(f"tensor {missing[0]!r} is missing ({len(missing)} missing in all, "
                        f"first: {missing[:5]})")
    unexpected = sorted(set(tensors) - set(wanted))
    if unexpected:
        raise GGUFError(f"tensor {unexpected[0]!r} is not part of this model "
                        f"({len(unexpected)} unexpected in all, first: {unexpected[:5]})")
    for name, shape in wanted.items():
        t = tensors[name]
        got = tuple(int(d) for d in reversed(t.shape.tolist()))
        if _ggml(got) != _ggml(shape):
            raise GGUFError(f"tensor {name!r} has shape {list(reversed(got))}, expected "
                            f"{list(reversed(shape))} (GGUF order, innermost first)")
        if t.tensor_type not in SUPPORTED_TYPES:
            raise GGUFError(f"tensor {name!r} has type {t.tensor_type.name}, which this reader "
                            f"does not dequantize (supported: "
                            f"{', '.join(q.name for q in SUPPORTED_TYPES)})")
    return tensors


def _decode(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """One slice of a tensor's stored data -> values (F32/F16 as read, BF16 as its bits)."""
    if qtype in (Q.F32, Q.F16):
        return data
    if qtype == Q.BF16:
        return data.view(np.uint16)
    return quants.dequantize(data, qtype)


def _finite(values: np.ndarray) -> bool:
    if values.dtype == np.uint16:  # bfloat16 bits: all-ones exponent is inf or nan
        return not bool(((values & 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(values).all())


def _tensor_chunks(tensor: Any, relayout: Relayout) -> Iterator[bytes]:
    """The hub-layout bytes of one GGUF tensor, dequantized a slice of its outer axis at a time."""
    data = tensor.data
    step = len(data) if data.ndim == 1 else max(1, _CHUNK_BYTES // max(1, data[0].nbytes))
    for start in range(0, len(data), step):
        values = relayout(_decode(data[start:start + step], tensor.tensor_type))
        if not _finite(values):
            raise GGUFError(f"tensor {tensor.name!r} holds non-finite values (inf or nan)")
        yield values.tobytes()


# --- the expert bias ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExpertBias:
    """A sidecar of the hub model's MoE output biases (safetensors bytes) and where it came from."""

    data: bytes = dataclasses.field(repr=False)
    source: str

    @property
    def label(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()


def expert_bias_keys(cfg: EncoderConfig) -> list[str]:
    """The hub keys of the expert output biases GGUF files lack, one per MoE layer."""
    return [hub for hub, name, _, _ in gguf_key_map(cfg) if name is None]


def read_expert_bias(bias: ExpertBias, cfg: EncoderConfig) -> dict[str, np.ndarray]:
    """A sidecar's vectors, checked: exactly the MoE layers' finite ``[D]`` biases."""
    source = bias.source
    try:
        tensors = load_safetensors_bytes(bias.data)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise GGUFError(f"expert-bias file {source} is not a safetensors file: {err}") from err
    wanted = expert_bias_keys(cfg)
    if sorted(tensors) != sorted(wanted):
        raise GGUFError(f"expert-bias file {source} holds {sorted(tensors)}; this model needs "
                        f"exactly {wanted}")
    for key in wanted:
        t = tensors[key]
        if t.shape != (cfg.hidden_size,) or t.dtype.kind != "f" or not np.isfinite(t).all():
            raise GGUFError(f"expert-bias file {source}: tensor {key!r} is {t.dtype} "
                            f"{list(t.shape)}, expected finite float [{cfg.hidden_size}]")
    return {k: tensors[k].astype(np.float32) for k in wanted}


def write_expert_bias(model_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the expert output biases of a hub-layout model directory (the official checkpoint)
    as a sidecar for GGUF files of the same model; reads only those tensors."""
    cfg = load_config(model_dir)
    index = checkpoint_index(weight_files(model_dir))
    vectors = {}
    for key in expert_bias_keys(cfg):
        if key not in index:
            raise CheckpointError(f"{model_dir} has no tensor {key!r}")
        with safe_open(str(index[key][0]), framework="numpy") as f:
            vectors[key] = f.get_tensor(key).astype(np.float32)
    out = Path(out)
    out.write_bytes(save_safetensors_bytes(vectors, metadata={"format": "nomic-expert-bias"}))
    return out


# --- the tokenizer -----------------------------------------------------------------------------


def tokenizer_from_gguf(meta: Metadata, rows: int) -> Tokenizer:
    """XLM-R's fast tokenizer rebuilt from ``tokenizer.ggml.*``: a SentencePiece Unigram with
    the charsmap normalizer, extra spaces collapsed, Metaspace, ``<s> $A </s>``.

    ``rows`` is the embedding table's; the trailing UNUSED ``[PADi]`` entries the converter pads
    the token list with up to it are not pieces of the hub tokenizer and are left out.
    """
    tokens, scores, types, ids = _vocabulary(meta, rows)
    tok = Tokenizer(models.Unigram(list(zip(tokens, scores)), unk_id=ids["unknown"],
                                   byte_fallback=False))
    tok.normalizer = normalizers.Sequence(_normalizers(meta))
    prepend = "always" if meta.get("tokenizer.ggml.add_space_prefix", "bool", True) else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend)
    # Control and unknown tokens are special (never split, never normalized), as in XLM-R's
    # tokenizer.json; user-defined ones are plain added tokens.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, normalized=False)
                    for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    tok.post_processor = _template(meta, tokens, ids["bos"], ids["eos"])
    return tok


def _vocabulary(meta: Metadata, rows: int) -> tuple[list[str], list[float], list[int], dict]:
    """Tokens, scores and types without the trailing padding, and the special ids; checked."""
    model = meta.get("tokenizer.ggml.model", "str")
    if model != "t5":
        raise GGUFError(f"metadata key 'tokenizer.ggml.model' is {model!r}; XLM-R's "
                        "SentencePiece Unigram tokenizer is stored as 't5'")
    tokens = meta.get("tokenizer.ggml.tokens", "strs")
    scores = meta.get("tokenizer.ggml.scores", "floats")
    types = meta.get("tokenizer.ggml.token_type", "ints")
    if not len(tokens) == len(scores) == len(types):
        raise GGUFError(f"metadata keys 'tokenizer.ggml.tokens', '.scores', '.token_type' have "
                        f"{len(tokens)}, {len(scores)}, {len(types)} entries; expected equal")
    if len(tokens) > rows:
        raise GGUFError(f"metadata key 'tokenizer.ggml.tokens' has {len(tokens)} tokens but "
                        f"tensor 'token_embd.weight' has {rows} rows")
    bad = sorted(set(types) - {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED})
    if bad:
        raise GGUFError(f"metadata key 'tokenizer.ggml.token_type' has types {bad}; XLM-R's "
                        "vocabulary has no byte-fallback (6) or other kinds")
    n = max((i + 1 for i, t in enumerate(types) if t != UNUSED), default=0)
    ids = {name: meta.get(f"tokenizer.ggml.{name}_token_id", "int")
           for name in ("bos", "eos", "unknown", "padding")}
    for name, i in ids.items():
        if not 0 <= i < n:
            raise GGUFError(f"metadata key 'tokenizer.ggml.{name}_token_id' is {i}, outside the "
                            f"{n} tokens")
    if types[ids["unknown"]] != UNKNOWN:
        raise GGUFError(f"metadata key 'tokenizer.ggml.unknown_token_id' is {ids['unknown']}, "
                        f"a token of type {types[ids['unknown']]}, not UNKNOWN (2)")
    return tokens[:n], scores[:n], types[:n], ids


def _normalizers(meta: Metadata) -> list:
    parts = []
    charsmap = meta.get("tokenizer.ggml.precompiled_charsmap", "bytes", b"")
    if charsmap:
        try:
            parts.append(normalizers.Precompiled(charsmap))
        except Exception as err:  # noqa: BLE001 - tokenizers raises its own exception type
            raise GGUFError("metadata key 'tokenizer.ggml.precompiled_charsmap' is not a "
                            f"SentencePiece charsmap: {err}") from err
    if meta.get("tokenizer.ggml.remove_extra_whitespaces", "bool", True):
        parts.append(normalizers.Replace(Regex(" {2,}"), " "))
    return parts


def _template(meta: Metadata, tokens: list[str], bos: int, eos: int) -> Any:
    first = [tokens[bos]] if meta.get("tokenizer.ggml.add_bos_token", "bool", True) else []
    last = [tokens[eos]] if meta.get("tokenizer.ggml.add_eos_token", "bool", True) else []
    single = " ".join(first + ["$A"] + last)
    pair = " ".join(first + ["$A"] + last + last + ["$B"] + last)  # XLM-R: <s> A </s></s> B </s>
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=[(tokens[bos], bos), (tokens[eos], eos)])


def _tokenizer_config(meta: Metadata, tok: Tokenizer) -> dict[str, Any]:
    names = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown",
             "pad_token": "padding", "sep_token": "seperator", "cls_token": "cls",
             "mask_token": "mask"}  # 'seperator': llama.cpp's spelling of the key
    config: dict[str, Any] = {"tokenizer_class": "XLMRobertaTokenizerFast",
                              "model_max_length": DEFAULT_CONTEXT}
    for field, key in names.items():
        i = meta.get(f"tokenizer.ggml.{key}_token_id", "int", None)
        if i is not None and (token := tok.id_to_token(i)) is not None:
            config[field] = token
    return config


# --- conversion --------------------------------------------------------------------------------


def zero_bias_warning(source: str) -> str:
    """What a run without the expert bias computes, said once per load of a GGUF."""
    return (f"{source}: GGUF files have no MoE expert output bias (llama.cpp's converter drops "
            "mlp.experts.bias); using zero, as llama.cpp does. The embeddings match llama.cpp's, "
            "not the hub model's (see docs/gguf.md). To restore it, write the hub checkpoint's "
            "vectors with `python -m pipeline.model.gguf expert-bias` and pass that file as "
            "the GGUF expert bias.")


def convert_gguf(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 expert_bias: ExpertBias | None = None, sha256: str | None = None
                 ) -> dict[str, Any]:
    """Write the hub-layout directory of the GGUF at ``path`` into ``out_dir``; returns its
    manifest (also written as ``_gguf.json``).

    ``expert_bias`` is a sidecar (see :func:`write_expert_bias`), None for zero, as llama.cpp.
    ``sha256`` is the GGUF's, when the caller knows it already.
    """
    reader = read_gguf(path)
    meta = Metadata(reader)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    cfg = config_from_gguf(meta, shapes)
    tensors = check_tensors(reader, cfg)
    tok = tokenizer_from_gguf(meta, cfg.vocab_size)
    bias = (read_expert_bias(expert_bias, cfg) if expert_bias is not None
            else {k: np.zeros(cfg.hidden_size, np.float32) for k in expert_bias_keys(cfg)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_safetensors(out / "model.safetensors", _entries(cfg, tensors, bias),
                       {"format": "pt", "source": "gguf"})
    (out / "config.json").write_text(
        json.dumps(hub_config_dict(cfg, name=f"gguf:{Path(path).name}"), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(meta, tok), indent=2))
    sha256 = sha256 or _sha256(Path(path))
    label = "zero" if expert_bias is None else expert_bias.label
    types = [t.tensor_type.name for t in tensors.values()]
    manifest = {
        "converter_version": CONVERTER_VERSION,
        "gguf": {"file": Path(path).name, "sha256": sha256, "size": os.path.getsize(path),
                 "name": meta.get("general.name", "str", None)},
        "quant_types": {t: types.count(t) for t in sorted(set(types))},
        "tensor_types": {n: t.tensor_type.name for n, t in tensors.items()},
        "expert_bias": label, "weights_fingerprint": f"sha256:{sha256}+expert_bias:{label}",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _entries(cfg: EncoderConfig, tensors: dict[str, Any], bias: dict[str, np.ndarray]) -> list:
    """``(hub key, dtype, hub shape, item size, chunks)`` for every tensor of the hub layout."""
    entries = []
    for (hub, name, _, relayout), (_, _, hub_shape, _) in zip(gguf_key_map(cfg), key_map(cfg)):
        if name is None:
            entries.append((hub, "F32", hub_shape, 4, lambda v=bias[hub]: iter([v.tobytes()])))
            continue
        t = tensors[name]
        dtype, np_type = _STORED.get(t.tensor_type, ("F32", np.float32))
        entries.append((hub, dtype, hub_shape, np.dtype(np_type).itemsize,
                        lambda t=t, r=relayout: _tensor_chunks(t, r)))
    return entries


def gguf_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``_gguf.json`` of a directory :func:`convert_gguf` wrote, or None for any other."""
    path = Path(model_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _write_safetensors(path: Path, entries: list, metadata: dict[str, str]) -> None:
    """A safetensors file written tensor by tensor (the header first: every size is known), so
    that the dequantized model is never whole in memory."""
    header: dict[str, Any] = {}
    offset = 0
    for key, dtype, shape, itemsize, _ in entries:
        size = math.prod(shape) * itemsize
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key, _, _, _, chunks in entries:
            start = f.tell()
            for chunk in chunks():
                f.write(chunk)
            begin, end = header[key]["data_offsets"]
            assert f.tell() - start == end - begin, f"{key}: wrote {f.tell() - start} bytes"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.model.gguf",
                                     description="GGUF files of nomic-embed-text-v2-moe")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("expert-bias", help="write the MoE expert output biases GGUF files lack, "
                       "from the official checkpoint's directory, as a sidecar file")
    p.add_argument("--model", required=True, help="hub-layout model directory (e.g. from `hf "
                   "download nomic-ai/nomic-embed-text-v2-moe --local-dir DIR`)")
    p.add_argument("--out", required=True, help="the sidecar to write (.safetensors)")
    p = sub.add_parser("convert", help="write the hub-layout model directory of a GGUF file")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("--out", required=True, help="directory to write (new or empty)")
    p.add_argument("--expert-bias", default="zero", help="zero (as llama.cpp) or a sidecar file")
    args = parser.parse_args(argv)
    if args.command == "expert-bias":
        out = write_expert_bias(args.model, args.out)
        print(f"wrote the expert output biases of {args.model} to {out}")
        return 0
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty")
    bias = None
    if args.expert_bias == "zero":
        print("warning: " + zero_bias_warning(args.gguf), file=sys.stderr)
    else:
        bias = ExpertBias(Path(args.expert_bias).read_bytes(), args.expert_bias)
    try:
        manifest = convert_gguf(args.gguf, out, expert_bias=bias)
    except GGUFError as err:
        parser.exit(2, f"{args.gguf}: {err}\n")
    print(f"wrote {out} ({', '.join(f'{n} {t}' for t, n in manifest['quant_types'].items())} "
          f"tensors; weights {manifest['weights_fingerprint']})")
    return 0

if __name__ == "__main__":
    sys.exit(main())
