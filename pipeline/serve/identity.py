"""What the service serves, and whether its vectors are comparable with a batch output's.

Vectors from the service and from the batch jobs are comparable only when they come from the
same weights, tokenizer, prefix rule, pooling and Matryoshka cut. The code is the same (the
encoder replicas run ``Embedder``); the weights and tokenizer are checked by their hashes:
``--expect-output`` reads what a batch run recorded in ``_manifest/_run.json``
(:func:`pipeline.units.run_identity`) and refuses a service that differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io.storage import MANIFEST_DIR, open_filesystem, storage_errors, to_uri
from ..model.config import MAX_SEQ_LEN, check_dims, load_config
from ..snapshots import LATEST, read_latest
from ..tokenize import TextTokenizer, TokenizerError
from ..units import RUN_FILE
from .config import ServeConfig

_LONG_HEX = re.compile(r"([0-9a-f]{12})[0-9a-f]{52}")


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """The model as the service resolved and checked it on its driver."""

    name: str
    source: str  # what the encoder replicas resolve (a local dir, or the source as given)
    revision: str | None
    fingerprint: str  # "sha256:..." over the weights (pipeline.model.sources.weights_fingerprint)
    tokenizer_sha256: str
    tokenizer_json: str = dataclasses.field(repr=False)
    hidden_size: int = 768
    widths: tuple[int, ...] = (768, 512, 256)
    max_input_tokens: int = MAX_SEQ_LEN
    created: int = 0

    @property
    def id(self) -> str:
        """``<name>@<fingerprint, each hash cut to 12 hex digits>``: the model id of the API."""
        return self.name + "@" + _LONG_HEX.sub(r"\1", self.fingerprint)

    def accepts(self, model: str | None) -> bool:
        """Whether a request's ``model`` names this model: absent, its id, its name, or its
        name with the whole fingerprint."""
        return model in (None, self.id, self.name, f"{self.name}@{self.fingerprint}")

    def card(self, dtype: str | None = None) -> dict[str, Any]:
        """This model's entry in ``GET /v1/models``."""
        return {"id": self.id, "object": "model", "created": self.created,
                "owned_by": "nomic-moe-pipeline", "name": self.name,
                "weights_fingerprint": self.fingerprint,
                "tokenizer_sha256": self.tokenizer_sha256, "dimensions": list(self.widths),
                "max_input_tokens": self.max_input_tokens, "dtype": dtype}


def load_served_model(config: ServeConfig) -> ServedModel:
    """Resolve the model once on the driver: its weights fingerprint, tokenizer and width,
    and the widths offered checked against it. Raises the model source's errors, ValueError."""
    # Lazy: model.sources imports torch (its checkpoint reader); a bad option should not wait.
    from ..model.sources import resolve_model, weights_fingerprint

    resolved = resolve_model(config.model, revision=config.revision,
                             storage_options=config.storage_options,
                             gguf_expert_bias=config.gguf_expert_bias)
    hidden = load_config(resolved.local_dir).hidden_size
    try:
        check_dims(config.dims, hidden)
    except ValueError as err:
        raise ValueError(f"--dims {','.join(map(str, config.dims))}: {err}: model "
                         f"{resolved.model_id} is {hidden} wide") from None
    path = Path(resolved.local_dir) / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"model {resolved.model_id} has no tokenizer.json")
    tokenizer_json = path.read_text(encoding="utf-8")
    TextTokenizer.from_json(tokenizer_json)  # refuses a tokenizer that is not this model's
    return ServedModel(
        name=config.served_model_name or _default_name(resolved.model_id, resolved.kind),
        source=str(resolved.local_dir) if resolved.kind == "local" else config.model,
        revision=resolved.revision, fingerprint=weights_fingerprint(resolved.local_dir),
        tokenizer_sha256=hashlib.sha256(tokenizer_json.encode()).hexdigest(),
        tokenizer_json=tokenizer_json, hidden_size=hidden, widths=config.dims,
        created=int(time.time()),
    )


def _default_name(model_id: str, kind: str) -> str:
    if kind == "hub":
        return model_id
    return os.path.basename(model_id.rstrip("/")) or model_id


def read_run_identity(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[
        dict[str, Any], str]:
    """The identity a batch run recorded, and the output it was read from. ``uri`` is an
    output folder, a nightly root (its ``_LATEST`` is followed) or that ``_LATEST`` file."""
    fs, path = open_filesystem(uri, storage_options)
    path = path.rstrip("/")
    if path.rsplit("/", 1)[-1] == LATEST:
        path = _snapshot(fs, path.rsplit("/", 1)[0], uri)
    elif not _exists(fs, f"{path}/{MANIFEST_DIR}/{RUN_FILE}", uri) \
            and _exists(fs, f"{path}/{LATEST}", uri):
        path = _snapshot(fs, path, uri)
    run_file = f"{path}/{MANIFEST_DIR}/{RUN_FILE}"
    if not _exists(fs, run_file, uri):
        raise UserError(f"--expect-output {uri}: no {MANIFEST_DIR}/{RUN_FILE} at "
                        f"{to_uri(fs, path)} (nor a nightly {LATEST}); name a batch output")
    with storage_errors(to_uri(fs, run_file), "read"):
        identity = json.loads(fs.cat_file(run_file))["identity"]
    return identity, to_uri(fs, path)


def _exists(fs, path: str, uri: str) -> bool:
    with storage_errors(uri, "read the batch output"):
        return fs.exists(path)


def _snapshot(fs, root: str, uri: str) -> str:
    name = read_latest(fs, root)
    if name is None:
        raise UserError(f"--expect-output {uri}: {to_uri(fs, root)}/{LATEST} does not exist")
    return f"{root}/{name}"


def identity_problems(identity: dict[str, Any], served: ServedModel) -> list[str]:
    """How a batch run's identity differs from the service in what its vectors depend on."""
    problems = []
    if identity.get("model_fingerprint") != served.fingerprint:
        problems.append(f"weights differ: the output was embedded with "
                        f"{identity.get('model_fingerprint')} ({identity.get('model_id')}), "
                        f"this service loads {served.fingerprint}")
    if identity.get("tokenizer_sha256") != served.tokenizer_sha256:
        problems.append(f"tokenizer differs: tokenizer.json sha256 "
                        f"{identity.get('tokenizer_sha256')} there, {served.tokenizer_sha256} "
                        f"here")
    missing = [d for d in identity.get("dims", []) if d not in served.widths]
    if missing:
        problems.append(f"widths {missing} of the output are not offered (this service: "
                        f"{list(served.widths)}; add them to --dims)")
    return problems


def dtype_warning(identity: dict[str, Any], dtype: str) -> str | None:
    """A warning when the service computes in another dtype than the batch run did."""
    recorded = identity.get("dtype")
    if recorded and recorded != dtype:
        return (f"the batch output was computed in {recorded}, this service computes in "
                f"{dtype}: vectors agree only to that precision (--dtype {recorded} matches)")
    return None


def check_expected_output(uri: str, served: ServedModel,
                          storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The batch output's identity, with ``output``: the output it was read from (the snapshot
    a nightly root or ``_LATEST`` named when checked); or :class:`UserError` naming every
    difference."""
    identity, where = read_run_identity(uri, storage_options)
    problems = identity_problems(identity, served)
    if problems:
        raise UserError(f"--expect-output {where}: this service's vectors would not be "
                        f"comparable with that output's: {'; '.join(problems)}")
    return dict(identity, output=where)
