"""``ServeConfig``: every option of ``python -m pipeline serve``, typed and declared once.

The command line (``pipeline/cli.py``) builds its options from these fields, and a Serve
application builder (``serve run pipeline.serve.app:app_builder key=value ...``, a RayService's
``args``) builds the same config from strings with :func:`config_from_strings`, so a default
lives only here.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from ..config import DEVICES, MODEL_DTYPES, parse_int_list
from ..model.config import DEFAULT_MODEL, MAX_SEQ_LEN

# The environment variable an entrypoint reads the API key from when --api-key is not given
# (a Kubernetes Secret sets it; a key on the command line shows in `ps`).
API_KEY_ENV = "NOMIC_PIPELINE_API_KEY"
# OpenAI's own limit on inputs per request.
MAX_INPUTS = 2048
BATCHING = ("queue", "serve-batch", "off")


def _field(default: Any, help: str, *, metavar: str | None = None, choices=None):
    return dataclasses.field(default=default,
                             metadata={"help": help, "metavar": metavar, "choices": choices})


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The query service: which model and widths, where it listens, its limits and replicas."""

    model: str = _field(DEFAULT_MODEL, "hub id, local model directory, fsspec prefix or GGUF "
                        "file (as for `run`)", metavar="SOURCE")
    revision: str | None = _field(None, "hub revision (branch, tag or commit) to pin",
                                  metavar="REV")
    gguf_expert_bias: str = _field("zero", "GGUF models: zero or the expert-bias sidecar file "
                                   "(docs/gguf.md)", metavar="zero|FILE")
    dims: tuple[int, ...] = _field((768, 512, 256), "Matryoshka widths the service offers; a "
                                   "request without `dimensions` gets the first",
                                   metavar="D,D,...")
    host: str = _field("127.0.0.1", "address the HTTP proxy listens on (0.0.0.0: every "
                       "interface)", metavar="HOST")
    port: int = _field(8000, "HTTP port", metavar="PORT")
    served_model_name: str | None = _field(None, "the model's name in the API (default: the hub "
                                           "id, or the model folder's name); its id is "
                                           "<name>@<weights fingerprint>", metavar="NAME")
    api_key: str | None = _field(None, f"require `Authorization: Bearer KEY` on /v1/ (default: "
                                 f"${API_KEY_ENV} when set, else no key)", metavar="KEY")
    expect_output: str | None = _field(None, "a batch output (or a nightly root or its _LATEST): "
                                       "refuse to start unless its weights, tokenizer and "
                                       "widths are this service's (warn on another dtype)",
                                       metavar="URI")
    truncate: bool = _field(False, f"cut texts over the model's {MAX_SEQ_LEN} tokens to fit "
                            "instead of refusing them with 400")
    max_inputs: int = _field(MAX_INPUTS, "most texts in one request", metavar="N")
    max_body_bytes: int = _field(16 << 20, "largest request body; a larger one gets 413",
                                 metavar="BYTES")
    max_queued_tokens: int = _field(65536, "tokens accepted and not yet answered, per ingress "
                                    "replica; beyond it a request gets 429 with Retry-After (a "
                                    "request is always taken when none is waiting)",
                                    metavar="N")
    max_batch_tokens: int | None = _field(None, "tokens per encoder batch gathered across "
                                          "requests (default: the encoder's token budget, "
                                          "4096 on CPU in float32, 16384 on GPU)", metavar="N")
    batch_wait_ms: float = _field(2.0, "how long an idle encoder waits for more requests to "
                                  "join a batch", metavar="MS")
    batching: str = _field("queue", "how an encoder replica batches requests: queue (its own: "
                           "a batch is taken when the encoder is free, everything waiting up to "
                           "--max-batch-tokens), serve-batch (Ray Serve's @serve.batch by "
                           "tokens) or off (each request alone); see docs/serve.md",
                           choices=BATCHING)
    replicas: int | None = _field(None, "encoder replicas (default: one per GPU, else 1)",
                                  metavar="N")
    ingress_replicas: int = _field(1, "tokenizing ingress replicas", metavar="N")
    device: str = _field("auto", "encoder device (auto: GPUs when the cluster has any)",
                         choices=DEVICES)
    dtype: str = _field("auto", "encoder compute dtype (auto: bfloat16 on GPU, float32 on CPU)",
                        choices=MODEL_DTYPES)
    encoder_threads: int | None = _field(None, "torch threads per CPU encoder replica (default: "
                                         "the node's cores / replicas)", metavar="N")
    address: str | None = _field(None, "Ray cluster address (default: $RAY_ADDRESS, else a "
                                 "local Ray)", metavar="ADDR")
    s3_endpoint: str | None = _field(None, "S3-compatible endpoint URL for the model and "
                                     "--expect-output", metavar="URL")

    def __post_init__(self) -> None:
        for name in ("device", "dtype", "batching"):
            allowed = self.__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {list(allowed)}")
        object.__setattr__(self, "dims", tuple(self.dims))
        if not self.dims:
            raise ValueError("dims must name at least one width")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.dims) \
                or len(set(self.dims)) != len(self.dims):
            raise ValueError(f"dims must be distinct positive widths, got {list(self.dims)}")
        for name in ("port", "max_inputs", "max_body_bytes", "max_queued_tokens",
                     "ingress_replicas", "replicas", "encoder_threads", "max_batch_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.port > 65535:
            raise ValueError(f"port must be at most 65535, got {self.port}")
        if self.max_inputs > MAX_INPUTS:
            raise ValueError(f"max_inputs must be at most {MAX_INPUTS} (the OpenAI limit), got "
                             f"{self.max_inputs}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < MAX_SEQ_LEN:
            raise ValueError(f"max_batch_tokens must be at least {MAX_SEQ_LEN} (one sequence of "
                             f"the longest length), got {self.max_batch_tokens}")
        wait = self.batch_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 1000:
            raise ValueError(f"batch_wait_ms must be a number from 0 to 1000, got {wait!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; leave it out to serve without a key")

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options for S3 URIs: the endpoint when one is given, else nothing."""
        return {"endpoint_url": self.s3_endpoint} if self.s3_endpoint else {}

    def public(self) -> dict[str, Any]:
        """The settings as a dict, the API key left out (for logs and /v1/models)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "api_key"}


def config_from_strings(args: Mapping[str, Any]) -> ServeConfig:
    """A config from ``key=value`` strings (``serve run`` arguments, a RayService's ``args``):
    each converted by its field's type; values already typed are kept."""
    hints = typing.get_type_hints(ServeConfig)
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"unknown serve option(s) {unknown}; the options are {sorted(fields)}")
    return ServeConfig(**{k: _convert(k, v, hints[k]) for k, v in args.items()})


def _convert(name: str, value: Any, hint) -> Any:
    if not isinstance(value, str):
        return tuple(value) if name == "dims" else value
    if name == "dims":
        return parse_int_list(value, "dims")
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if kinds[0] is bool:
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    try:
        return kinds[0](value)
    except ValueError:
        raise ValueError(f"{name} must be {kinds[0].__name__}, got {value!r}") from None
