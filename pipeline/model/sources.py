"""Where the model comes from: a local directory, an fsspec URI (s3://, gs://, ...) or a hub repo,
or a GGUF file (llama.cpp's format) in any of those places.

Every source resolves to a local directory in the hub layout (``config.json``, safetensors
weights, tokenizer files) that :func:`pipeline.model.load_encoder` reads. Remote copies are
cached once per node; pickle checkpoints (``*.bin``, ``*.pt``, ...) are never downloaded. A GGUF
file is converted once (per node, per content) into such a directory in the model cache
(:mod:`pipeline.model.gguf`).

Cluster nodes often have no route to huggingface.co, so every failure to reach a source is a
:class:`ModelSourceError` raised within seconds, naming the source and what to do instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec

from .checkpoint import PICKLE_SUFFIXES, weight_files
from .config import DEFAULT_MODEL
from .gguf import (CONVERTER_VERSION, ExpertBias, GGUFError, GGUFExpertBiasWarning,
                   convert_gguf, gguf_manifest, zero_bias_warning)


# The files a model directory needs; anything else under a remote prefix is left behind.
MODEL_FILES = frozenset({
    "config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "sentencepiece.bpe.model",
})
HUB_ALLOW_PATTERNS = sorted(MODEL_FILES) + ["*.safetensors"]
MANIFEST = "_source.json"
ENV_CACHE = "NOMIC_PIPELINE_CACHE"
DEFAULT_CACHE = Path("~/.cache/nomic-moe-pipeline/models")

# Bounds chosen so that an unreachable source fails in well under 30 s. huggingface_hub 2.x
# sends its metadata calls (repo_info, list_repo_tree) with no timeout at all, so we pass one.
# S3: botocore's defaults (60 s connect timeout, 5 attempts) take ~10 s on a refused port and
# minutes on a silent one; 2 attempts x 5 s bound a silent endpoint to ~11 s. s3fs retries
# throttling (SlowDown) and read errors itself, on top of these attempts.
HUB_METADATA_TIMEOUT_S = 10.0
S3_CONNECT_TIMEOUT_S = 5
S3_MAX_ATTEMPTS = 2
_HASH_CHUNK = 8 << 20
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
# A GGUF file in a hub repo: `org/name/path/to/file.gguf`.
_HUB_GGUF = re.compile(rf"({_REPO_PART}/{_REPO_PART})/((?:[A-Za-z0-9._-]+/)*[A-Za-z0-9._-]+"
                       r"\.gguf)", re.IGNORECASE)
GGUF_SUFFIX = ".gguf"
_PATH_PREFIXES = ("/", "./", "../", "~")

SourceKind = Literal["local", "fsspec", "hub"]


class ModelSourceError(RuntimeError):
    """A model source does not exist, cannot be reached, or does not hold a usable model."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model source made local: ``local_dir`` holds config.json, safetensors and tokenizer.

    ``gguf`` describes a GGUF source (its sha256, the tensor types it held and the expert bias
    used); None for every other source.
    """

    local_dir: Path
    model_id: str
    revision: str | None
    kind: SourceKind
    gguf: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """``{"model_id", "revision", "kind"}`` for output metadata (hub revision = commit),
        and ``"gguf"`` for a GGUF source."""
        described: dict[str, Any] = {"model_id": self.model_id, "revision": self.revision,
                                     "kind": self.kind}
        return described | ({"gguf": self.gguf} if self.gguf else {})


def resolve_model(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    gguf_expert_bias: str | os.PathLike[str] = "zero",
) -> ResolvedModel:
    """Make ``source`` available as a local hub-layout directory.

    ``source`` is a local directory (or ``file://`` URI), an fsspec URI whose files sit directly
    under the prefix (``s3://bucket/models/nomic-v2/``), or a hub repo id (``org/name``); or a
    ``.gguf`` file: a local path, an fsspec URI, or ``org/name/file.gguf`` in a hub repo.
    ``revision`` (branch, tag or commit) applies to hub repos only. ``cache_dir`` holds remote
    copies and converted GGUF files (default ``$NOMIC_PIPELINE_CACHE`` or
    ``~/.cache/nomic-moe-pipeline/models``; for hub downloads the Hugging Face cache).
    ``storage_options`` go to ``fsspec.core.url_to_fs``. ``gguf_expert_bias`` (GGUF sources
    only) is ``"zero"``, what llama.cpp computes, or a sidecar file (path or URI) of the hub
    checkpoint's MoE output biases, which GGUF files lack (see :mod:`pipeline.model.gguf`).
    """
    kind = source_kind(source)
    if revision is not None and kind != "hub":
        raise ModelSourceError(
            f"revision={revision!r} applies to hub repo ids only; {str(source)!r} is a {kind} "
            "source, pin it by its path instead"
        )
    if is_gguf_source(source):
        return _resolve_gguf(source, kind, revision, cache_dir, storage_options or {},
                             os.fspath(gguf_expert_bias))
    if os.fspath(gguf_expert_bias) != "zero":
        _check_converted_bias(source, kind, os.fspath(gguf_expert_bias), storage_options or {})
    if kind == "local":
        path = _resolve_local(source)
        return ResolvedModel(path, str(path), None, "local")
    if kind == "fsspec":
        uri = _normalise_uri(str(source))
        path = _resolve_fsspec(uri, _cache_root(cache_dir), storage_options or {})
        return ResolvedModel(path, uri, None, "fsspec")
    path, commit = _resolve_hub(str(source), revision, cache_dir)
    return ResolvedModel(path, str(source), commit, "hub")


def resolve_model_dir(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """The local directory of :func:`resolve_model` (same arguments, same errors)."""
    return resolve_model(
        source, revision=revision, cache_dir=cache_dir, storage_options=storage_options
    ).local_dir


def describe_source(
    source: str | os.PathLike[str], revision: str | None = None
) -> dict[str, str | None]:
    """``{"model_id", "revision", "kind"}`` without network access or downloads.

    The revision is the one asked for; :meth:`ResolvedModel.describe` gives the hub commit.
    """
    kind = source_kind(source)
    if kind == "local":
        model_id = str(_local_path(source).resolve())
    elif kind == "fsspec":
        model_id = _normalise_uri(str(source))
    else:
        model_id = str(source)
    return {"model_id": model_id, "revision": revision, "kind": kind}


def source_kind(source: str | os.PathLike[str]) -> SourceKind:
    """Classify a source: ``local`` path, ``fsspec`` URI, or ``hub`` repo id (validated)."""
    if not isinstance(source, str):
        return "local"
    if not source.strip():
        # Path("") is the working directory; an empty option is a mistake, not a request for it.
        raise ModelSourceError("model source is empty; pass a directory, URI or hub repo id")
    if "://" in source:
        return "local" if source.startswith("file://") else "fsspec"
    if _looks_like_path(source):
        return "local"
    hub_file = _HUB_GGUF.fullmatch(source)
    repo_id = hub_file.group(1) if hub_file else source
    if not _REPO_ID.fullmatch(repo_id) or ".." in source or "--" in repo_id:
        raise ModelSourceError(
            f"model source {source!r} is not an existing local directory, an fsspec URI "
            "(s3://bucket/prefix/, gs://..., file:///path), a Hugging Face repo id of the "
            f"form 'org/name' (e.g. {DEFAULT_MODEL!r}) or a GGUF file ('org/name/file.gguf' in "
            "a hub repo, or a path or URI ending in .gguf)"
        )
    return "hub"


def is_gguf_source(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names a GGUF file (by its suffix, ``.gguf``)."""
    return os.fspath(source).rstrip("/").lower().endswith(GGUF_SUFFIX)


def weights_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """``"sha256:<hex>"`` over the names and bytes of the safetensors weights of ``model_dir``.

    Uses the same file list as the loader (index-aware), so extra files do not change it. A
    directory converted from a GGUF file has the GGUF's: ``"sha256:<gguf>+expert_bias:zero"``
    (or ``+expert_bias:sha256:<sidecar>``).
    """
    manifest = gguf_manifest(model_dir)
    if manifest is not None:
        return manifest["weights_fingerprint"]
    digest = hashlib.sha256()
    for path in weight_files(Path(model_dir)):
        # Name and length delimit each file so that moving bytes between files changes the hash.
        digest.update(path.name.encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        _hash_into(digest, path)
    return f"sha256:{digest.hexdigest()}"


# --- local ---------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    # A relative path whose first component exists ("models/nomic") is a path with a typo,
    # not a hub id; reporting it as a missing directory is the more useful error.
    if source.startswith(_PATH_PREFIXES):
        return True
    return Path(source).exists() or Path(source.split("/")[0]).exists()


def _local_path(source: str | os.PathLike[str]) -> Path:
    text = os.fspath(source)
    return Path(text.removeprefix("file://")).expanduser()


def _resolve_local(source: str | os.PathLike[str]) -> Path:
    path = _local_path(source)
    if not path.exists():
        raise ModelSourceError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelSourceError(
            f"model source {str(path)!r} is a file; pass the directory holding config.json "
            "and the *.safetensors weights"
        )
    return path.resolve()


# --- fsspec (s3://, gs://, memory://, ...) ---------------------------------------------------


@dataclass(frozen=True)
class _RemoteFile:
    path: str
    size: int
    version: str | None  # ETag / checksum / mtime, whatever the filesystem reports


def _normalise_uri(uri: str) -> str:
    protocol, _, rest = uri.partition("://")
    return f"{protocol.lower()}://{rest.rstrip('/')}"


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    root = cache_dir if cache_dir is not None else os.environ.get(ENV_CACHE) or DEFAULT_CACHE
    return Path(root).expanduser()


def _cache_dir_for(root: Path, uri: str) -> Path:
    # Readable leaf name for humans, hash for uniqueness across buckets and endpoints' paths.
    leaf = re.sub(r"[^A-Za-z0-9._-]", "_", uri.rsplit("/", 1)[-1])[:40] or "model"
    return root / f"{leaf}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"


def _resolve_fsspec(uri: str, root: Path, storage_options: dict[str, Any]) -> Path:
    fs, prefix = _open_fs(uri, storage_options)
    remote = _list_model_files(fs, uri, prefix)
    target = _cache_dir_for(root, uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several workers on one node resolve the same model at start-up; one downloads.
    with _file_lock(target.with_name(target.name + ".lock")):
        if not _cache_is_current(target, uri, remote):
            _download(fs, uri, remote, target)
    return target


def _storage_options(protocol: str, user: dict[str, Any]) -> dict[str, Any]:
    # A fresh filesystem per resolve: fsspec's instance cache would otherwise keep an s3
    # client bound to an old endpoint or old credentials, and stale directory listings.
    options: dict[str, Any] = {"skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        config = {"connect_timeout": S3_CONNECT_TIMEOUT_S,
                  "retries": {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}}
        options["config_kwargs"] = config | dict(user.get("config_kwargs") or {})
    return options | {k: v for k, v in user.items() if k != "config_kwargs"}


def _open_fs(uri: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    protocol = uri.partition("://")[0]
    with _remote_errors(uri, "open"):
        return fsspec.core.url_to_fs(uri, **_storage_options(protocol, storage_options))


@contextlib.contextmanager
def _remote_errors(uri: str, action: str) -> Iterator[None]:
    """Turn a filesystem backend's error into a ModelSourceError naming ``uri`` and the cause."""
    try:
        yield
    except ModelSourceError:
        raise
    except FileNotFoundError as err:
        raise ModelSourceError(f"cannot {action} {uri}: no such bucket or prefix ({err})") from err
    except (ImportError, ValueError) as err:  # backend not installed, unknown protocol/option
        raise ModelSourceError(f"cannot {action} {uri}: {err}") from err
    except PermissionError as err:
        raise ModelSourceError(
            f"cannot {action} {uri}: permission denied ({err}); check the credentials "
            "(AWS_PROFILE / AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, storage_options)"
        ) from err
    except Exception as err:  # noqa: BLE001 - backends raise their own types (botocore, aiohttp)
        raise ModelSourceError(
            f"cannot {action} {uri}: {type(err).__name__}: {err} (is the endpoint reachable? "
            "for S3-compatible stores set AWS_ENDPOINT_URL)"
        ) from err


def _list_model_files(
    fs: fsspec.AbstractFileSystem, uri: str, prefix: str
) -> dict[str, _RemoteFile]:
    """The model files directly under ``prefix``, by name; checks config and weights exist."""
    with _remote_errors(uri, "list"):
        entries = fs.ls(prefix, detail=True)
    if any(e["name"].rstrip("/") == prefix.rstrip("/") for e in entries):
        raise ModelSourceError(f"{uri} is a file; pass the prefix (directory) that holds it")
    files = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries if e["type"] == "file"}
    wanted = {n: e for n, e in files.items() if n in MODEL_FILES or n.endswith(".safetensors")}
    if "config.json" not in wanted:
        raise ModelSourceError(f"{uri} has no config.json (files there: {sorted(files)})")
    if not any(n.endswith(".safetensors") for n in wanted):
        pickles = sorted(n for n in files if n.endswith(PICKLE_SUFFIXES))
        raise ModelSourceError(
            f"{uri} has no *.safetensors weights (pickle checkpoints {pickles} are never "
            "downloaded: unpickling can execute arbitrary code; convert them to safetensors)"
        )
    return {n: _RemoteFile(e["name"], int(e["size"]), _remote_version(e))
            for n, e in wanted.items()}


def _remote_version(info: dict[str, Any]) -> str | None:
    # Content hashes first (s3 ETag, gcs md5Hash/crc32c); the modification time is the fallback
    # for filesystems without one (memory://, some http servers).
    for key in ("ETag", "etag", "md5Hash", "crc32c", "checksum", "LastModified", "mtime",
                "updated", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return None


def _cache_is_current(target: Path, uri: str, remote: dict[str, _RemoteFile]) -> bool:
    """True when ``target`` holds exactly the remote files as listed now (sizes, versions)."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    recorded = manifest.get("files", {})
    if manifest.get("uri") != uri or set(recorded) != set(remote):
        return False
    for name, rf in remote.items():
        entry, local = recorded[name], target / name
        if entry.get("size") != rf.size or entry.get("version") != rf.version:
            return False
        if not local.is_file() or local.stat().st_size != rf.size:
            return False
    return True


def _download(
    fs: fsspec.AbstractFileSystem, uri: str, remote: dict[str, _RemoteFile], target: Path
) -> None:
    """Copy ``remote`` into ``target`` via a temp dir, so a killed download never looks complete."""
    tmp = _sibling_tmp(target, ".partial")
    try:
        manifest: dict[str, Any] = {"uri": uri, "downloaded_at": time.time(), "files": {}}
        for name, rf in sorted(remote.items()):
            local = tmp / name
            with _remote_errors(uri, f"download {rf.path} from"):
                fs.get_file(rf.path, str(local))
            if local.stat().st_size != rf.size:
                raise ModelSourceError(
                    f"downloaded {rf.path} has {local.stat().st_size} bytes but the listing of "
                    f"{uri} says {rf.size}; was it modified during the download? retry"
                )
            manifest["files"][name] = asdict(rf) | {"sha256": _sha256_file(local)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    # os.replace cannot overwrite a non-empty directory: move the stale copy aside first. The
    # caller holds the lock, so no other resolver of this node sees the short gap.
    if target.exists():
        stale = _sibling_tmp(target, ".stale")
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(new, target)


def _sibling_tmp(target: Path, suffix: str) -> Path:
    # Beside the target, so that os.replace stays a rename on one filesystem (atomic).
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent))


def _hash_into(digest: Any, path: Path) -> None:
    with path.open("rb") as f:  # streamed: weights are GBs
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    _hash_into(digest, path)
    return digest.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- GGUF files (llama.cpp) ------------------------------------------------------------------


def _resolve_gguf(source: str | os.PathLike[str], kind: SourceKind, revision: str | None,
                  cache_dir: str | os.PathLike[str] | None, storage_options: dict[str, Any],
                  expert_bias: str) -> ResolvedModel:
    """The GGUF file made local, then converted once into a hub-layout directory of the model
    cache, keyed by the file's sha256, the expert bias and the converter's version."""
    path, model_id, commit, sha = _gguf_file(source, kind, revision, cache_dir, storage_options)
    bias = _read_expert_bias(expert_bias, storage_options)
    tag = "zero" if bias is None else f"bias{bias.label.removeprefix('sha256:')[:12]}"
    leaf = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:40]
    target = _cache_root(cache_dir) / "gguf" / f"{leaf}-{sha[:16]}-{tag}-v{CONVERTER_VERSION}"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several workers on one node resolve the same file at start-up; one converts.
    with _file_lock(target.with_name(target.name + ".lock")):
        if gguf_manifest(target) is None:
            tmp = _sibling_tmp(target, ".partial")
            try:
                convert_gguf(path, tmp, expert_bias=bias, sha256=sha)
                _replace_dir(tmp, target)
            except GGUFError as err:
                raise GGUFError(f"{model_id}: {err}") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    manifest = gguf_manifest(target)
    if bias is None:
        warnings.warn(zero_bias_warning(model_id), GGUFExpertBiasWarning, stacklevel=3)
    info = {"sha256": sha, "quant_types": manifest["quant_types"],
            "expert_bias": manifest["expert_bias"]}
    return ResolvedModel(target, model_id, commit, kind, info)


def _gguf_file(source: str | os.PathLike[str], kind: SourceKind, revision: str | None,
               cache_dir: str | os.PathLike[str] | None, storage_options: dict[str, Any]
               ) -> tuple[Path, str, str | None, str]:
    """``(local copy, model id, hub commit, sha256)`` of a GGUF source."""
    if kind == "local":
        path = _local_path(source).resolve()
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {str(path)!r} does not exist")
        return path, str(path), None, _sha256_file(path)
    if kind == "fsspec":
        uri = _normalise_uri(str(source))
        path, sha = _fetch_fsspec_file(uri, _cache_root(cache_dir), storage_options)
        return path, uri, None, sha
    repo_id, filename = _HUB_GGUF.fullmatch(str(source)).groups()
    path, commit = _resolve_hub(repo_id, revision, cache_dir, filename)
    return path, str(source), commit, _sha256_file(path)


def _check_converted_bias(source: str | os.PathLike[str], kind: SourceKind, expert_bias: str,
                          storage_options: dict[str, Any]) -> None:
    """A sidecar applies to GGUF files, and to a directory converted from one with it (what
    the driver hands a local GGUF's workers); anything else is a mistake worth an error."""
    manifest = gguf_manifest(_local_path(source)) if kind == "local" else None
    if manifest is None:
        raise ModelSourceError(f"the GGUF expert bias applies to .gguf model files only; "
                               f"{str(source)!r} is not one")
    label = _read_expert_bias(expert_bias, storage_options).label
    if manifest["expert_bias"] != label:
        raise ModelSourceError(f"{str(source)!r} was converted with expert bias "
                               f"{manifest['expert_bias']}, not {expert_bias!r} ({label})")


def _read_expert_bias(source: str, storage_options: dict[str, Any]) -> ExpertBias | None:
    """The sidecar (a path or URI), or None for ``"zero"``."""
    if source == "zero":
        return None
    if "://" not in source or source.startswith("file://"):
        path = _local_path(source)
        if not path.is_file():
            raise ModelSourceError(f"GGUF expert-bias file {str(path)!r} does not exist")
        data = path.read_bytes()
    else:
        fs, path = _open_fs(source, storage_options)
        with _remote_errors(source, "read"), fs.open(path, "rb") as f:
            data = f.read()
    return ExpertBias(data, source)


def _fetch_fsspec_file(uri: str, root: Path, storage_options: dict[str, Any]) -> tuple[Path, str]:
    """One remote file, cached like a model prefix (by listing size and version); returns the
    local copy and its sha256."""
    fs, path = _open_fs(uri, storage_options)
    with _remote_errors(uri, "stat"):
        info = fs.info(path)
    if info.get("type") != "file":
        raise ModelSourceError(f"{uri} is not a file (a GGUF source names the .gguf file)")
    name = info["name"].rstrip("/").rsplit("/", 1)[-1]
    remote = {name: _RemoteFile(info["name"], int(info["size"]), _remote_version(info))}
    target = _cache_dir_for(root, uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock")):
        if not _cache_is_current(target, uri, remote):
            _download(fs, uri, remote, target)
    manifest = json.loads((target / MANIFEST).read_text())
    return target / name, manifest["files"][name]["sha256"]


# --- Hugging Face Hub ------------------------------------------------------------------------


def _resolve_hub(
    repo_id: str, revision: str | None, cache_dir: str | os.PathLike[str] | None,
    filename: str | None = None,
) -> tuple[Path, str]:
    """Download (or reuse from the HF cache) the model files, or the one file ``filename``;
    returns ``(dir or file, commit)``."""

    from huggingface_hub import errors  # imported where used: ~0.3 s that a local model skips

    endpoint = _hub_endpoint()
    if _hub_offline():
        return _hub_from_cache(repo_id, revision, cache_dir, endpoint, "HF_HUB_OFFLINE is set",
                               filename)
    try:
        commit = _hub_commit(repo_id, revision, endpoint)
        folder = _hub_snapshot(repo_id, commit, cache_dir, endpoint, local_files_only=False,
                               filename=filename)
        _record_hub_ref(repo_id, revision, commit, cache_dir)
    except errors.RevisionNotFoundError as err:
        message = f"revision {revision or 'main'!r} does not exist in hub repo {repo_id!r}"
        raise ModelSourceError(message) from err
    except errors.RemoteEntryNotFoundError as err:
        raise ModelSourceError(f"hub repo {repo_id!r} has no file {filename!r} at revision "
                               f"{revision or 'main'!r}") from err
    except errors.GatedRepoError as err:
        raise ModelSourceError(
            f"hub repo {repo_id!r} is gated: accept its terms on the Hub, then log in "
            "(`hf auth login`) or set HF_TOKEN"
        ) from err
    except errors.RepositoryNotFoundError as err:
        raise ModelSourceError(
            f"hub repo {repo_id!r} was not found (or is private and no valid HF_TOKEN is set)"
        ) from err
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, *_hub_network_errors()) as err:
        # LocalEntryNotFoundError: a file download that could not reach the Hub.
        cause = f"{type(err).__name__}: {err}"
        return _hub_from_cache(repo_id, revision, cache_dir, endpoint, cause, filename)
    return folder, commit


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again so that a value set
    # later in the process (a test, a Ray runtime_env) is honoured as well.

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        from huggingface_hub import constants  # lazy: see _resolve_hub

        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_endpoint() -> str | None:
    # Same reason as _hub_offline: HF_ENDPOINT is otherwise frozen at import time.
    return os.environ.get("HF_ENDPOINT") or None


def _hub_network_errors() -> tuple[type[BaseException], ...]:
    # The Hub client's transport changed across huggingface_hub majors (requests, httpx,
    # httpx2); a refused or timed-out connection surfaces as that library's own error type.
    # Only an imported module can have raised, so sys.modules is enough.
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "RequestException")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def _hub_commit(repo_id: str, revision: str | None, endpoint: str | None) -> str:
    """The commit ``revision`` points at, asked with a bounded timeout (fails fast offline)."""

    from huggingface_hub import HfApi  # lazy: see _resolve_hub

    api = HfApi(endpoint=endpoint)
    info = api.repo_info(repo_id, revision=revision, timeout=HUB_METADATA_TIMEOUT_S)
    if not info.sha:
        raise ModelSourceError(f"the Hub returned no commit for {repo_id!r} at {revision!r}")
    return info.sha


def _hub_snapshot(
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    endpoint: str | None,
    *,
    local_files_only: bool,
    filename: str | None = None,
) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download  # lazy: see _resolve_hub

    if filename is not None:
        return Path(hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
            etag_timeout=HUB_METADATA_TIMEOUT_S, local_files_only=local_files_only,
        ))
    folder = snapshot_download(
        repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS, cache_dir=cache_dir,
        endpoint=endpoint, etag_timeout=HUB_METADATA_TIMEOUT_S, local_files_only=local_files_only,
    )
    return Path(folder)


def _record_hub_ref(
    repo_id: str, revision: str | None, commit: str, cache_dir: str | os.PathLike[str] | None
) -> None:
    """Write the cache's ``refs/<revision>`` file, as snapshot_download does for branches."""
    # We download by commit (resolved with a bounded timeout), and huggingface_hub writes
    # refs/<branch> only when it resolves the branch itself; without the file an offline run
    # (HF_HUB_OFFLINE=1) could not find this snapshot by branch or tag name.

    from huggingface_hub import constants  # lazy: see _resolve_hub
    from huggingface_hub.file_download import repo_folder_name

    name = revision or constants.DEFAULT_REVISION
    if name == commit:
        return
    root = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    ref = root / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / name
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)  # readers never see a half-written ref


def _hub_from_cache(
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    endpoint: str | None,
    cause: str,
    filename: str | None = None,
) -> tuple[Path, str]:
    """The Hugging Face cache's copy when the Hub cannot be reached, else a how-to error."""

    try:
        folder = _hub_snapshot(repo_id, revision, cache_dir, None, local_files_only=True,
                               filename=filename)
    except FileNotFoundError as err:  # LocalEntryNotFoundError: not in the cache either
        from huggingface_hub import constants  # lazy: see _resolve_hub

        what = f"{repo_id} {filename}" if filename else repo_id
        raise ModelSourceError(
            f"could not reach the Hugging Face Hub at {endpoint or constants.ENDPOINT} for "
            f"{repo_id!r} ({cause}) and no copy is in "
            "the local Hugging Face cache. To use a local copy, download it on a connected "
            f"machine with `hf download {what} --local-dir DIR` (or `huggingface-cli "
            f"download {what} --local-dir DIR`), then pass that directory (or an s3:// "
            f"copy of it{', the .gguf file in it' if filename else ''}) as the model source"
        ) from err
    # Snapshot folders are named by commit hash (huggingface_hub cache layout).
    snapshot = folder.parents[len(Path(filename).parts) - 1] if filename else folder
    return folder, snapshot.name
