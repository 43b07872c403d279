"""The OpenAI embeddings contract: request bodies checked into :class:`EmbeddingRequest`, the
response and error envelopes, vectors as JSON floats or base64. Pure: no Ray, no torch.

``POST /v1/embeddings`` takes ``input`` (a string or a list of up to 2,048 strings), ``model``,
``dimensions``, ``encoding_format`` (``float`` or ``base64``: little-endian float32 bytes),
``user`` and our own ``task`` (``query`` by default). Every refusal is an :class:`ApiError`
carrying its HTTP status and OpenAI's envelope ``{"error": {"message", "type", "param",
"code"}}``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any, Sequence

import numpy as np

from ..tokenize import TASK_PREFIXES

ENCODINGS = ("float", "base64")
DEFAULT_TASK = "query"  # this endpoint embeds questions; the corpus side is `document`
FIELDS = ("input", "model", "dimensions", "encoding_format", "user", "task")
FINGERPRINT_HEADER = "X-Weights-Fingerprint"


class ApiError(Exception):
    """A refused request: its HTTP status, OpenAI's error fields and extra headers."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def http_error(status: int, detail: str) -> ApiError:
    """The envelope for the web framework's own refusals (an unknown route, a wrong method)."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    return ApiError(status, detail, code=codes.get(status))


@dataclasses.dataclass(frozen=True)
class EmbeddingRequest:
    """A checked request: the texts in input order and how to embed and encode them."""

    texts: tuple[str, ...]
    model: str | None
    width: int
    encoding: str
    task: str
    user: str | None


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}", code="invalid_json") \
            from None


def parse_request(body: Any, widths: Sequence[int], max_inputs: int) -> EmbeddingRequest:
    """Check a ``/v1/embeddings`` body; raises :class:`ApiError` (400) naming what to fix.

    ``widths`` are the widths offered (a request without ``dimensions`` gets the first).
    """
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {_kind(body)}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise bad_request(f"unknown field(s) {unknown}; this endpoint takes {list(FIELDS)}",
                          param=unknown[0])
    if "input" not in body:
        raise bad_request("`input` is required: a string or a list of strings", param="input")
    texts = _texts(body["input"], max_inputs)
    return EmbeddingRequest(
        texts=texts, model=_optional_str(body, "model"), width=_width(body, widths),
        encoding=_choice(body, "encoding_format", ENCODINGS, "float"),
        task=_choice(body, "task", tuple(TASK_PREFIXES), DEFAULT_TASK),
        user=_optional_str(body, "user"),
    )


def _texts(value: Any, max_inputs: int) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise bad_request(f"`input` must be a string or a list of strings, not {_kind(value)}",
                          param="input")
    if not value:
        raise bad_request("`input` is an empty list; send at least one string", param="input")
    if all(_is_id(v) for v in value) or all(
            isinstance(v, list) and v and all(_is_id(i) for i in v) for v in value):
        raise bad_request("token-id inputs are refused: ids made by another tokenizer would "
                          "embed garbage; send the text and the service tokenizes it",
                          param="input", code="token_ids_refused")
    if len(value) > max_inputs:
        raise bad_request(f"`input` has {len(value)} strings, more than the {max_inputs} one "
                          "request may hold; split it", param="input")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise bad_request(f"input[{i}] is {_kind(text)}, not a string", param="input")
        if not text.strip():
            raise bad_request(f"input[{i}] is empty or whitespace only", param="input")
    return tuple(value)


def _is_id(value: Any) -> bool:
    """A token id, as OpenAI's API takes them (a list of these, or a list of such lists)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _width(body: dict, widths: Sequence[int]) -> int:
    width = body.get("dimensions")
    if width is None:
        return widths[0]
    if not _is_id(width):
        raise bad_request(f"`dimensions` must be an integer, not {_kind(width)}",
                          param="dimensions")
    if width not in widths:
        raise bad_request(f"`dimensions` {width!r} is not offered; this service offers "
                          f"{list(widths)}", param="dimensions")
    return width


def _choice(body: dict, name: str, allowed: Sequence[str], default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if value not in allowed:
        raise bad_request(f"`{name}` {value!r} is not one of {list(allowed)}", param=name)
    return value


def _optional_str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"`{name}` must be a string, not {_kind(value)}", param=name)
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}")


def encode_vector(vector: np.ndarray, encoding: str) -> list[float] | str:
    """One float32 vector as JSON floats (each exactly the float32 value) or as base64 of
    its little-endian float32 bytes."""
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()
    return vector.astype(np.float32, copy=False).tolist()


def embedding_response(vectors_NW: np.ndarray, encoding: str, model_id: str,
                       tokens: int) -> dict[str, Any]:
    """The response body: one entry per input, in input order."""
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, encoding)}
            for i, v in enumerate(vectors_NW)]
    return {"object": "list", "data": data, "model": model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
