"""Offline-first weight resolution and loading for patch encoders (never downloads).

Order: explicit path (``--encoder-weights NAME=PATH``) → weights directory (``--weights-dir`` or
``$ATLASPATCH_WEIGHTS_DIR``; ``<dir>/<encoder>/<file>`` or ``<dir>/<encoder>.{safetensors,pt,pth,bin}``)
→ weights shipped in an installed Python package → local Hugging Face cache → torch hub cache
(torchvision files). Files are read with safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..params import ref
from .errors import WeightsLoadError, WeightsNotFoundError

if TYPE_CHECKING:
    from .base import EncoderSpec

WEIGHTS_DIR_ENV = "ATLASPATCH_WEIGHTS_DIR"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
CONFIG_FILES = ("config.json", "open_clip_config.json")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
WeightsArg = str | os.PathLike | Mapping[str, str | os.PathLike] | None

_EW, _WD = ref("models", "encoder_weights"), ref("models", "weights_dir")


@dataclass(frozen=True)
class ResolvedWeights:
    """A located weights file (``shards`` lists every file of a sharded checkpoint)."""

    path: Path
    source: str  # explicit | weights_dir | package | hf_cache | torch_hub
    shards: tuple[Path, ...] = field(default=())

    @property
    def files(self) -> tuple[Path, ...]:
        return self.shards or (self.path,)


def explicit_for(weights: WeightsArg, name: str) -> Path | None:
    """The explicit weights path for ``name`` from a path or a ``{encoder: path}`` mapping."""
    if weights is None:
        return None
    if isinstance(weights, Mapping):
        value = weights.get(name)
        return Path(value).expanduser() if value else None
    return Path(weights).expanduser()


def _in_dir(directory: Path, spec: EncoderSpec) -> Path | None:
    """A weights file for ``spec`` inside a directory (preferred names first, else a single file)."""
    for fname in spec.weight_files:
        if (directory / fname).is_file():
            return directory / fname
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return found[0] if len(found) == 1 else None


def _hf_candidates(repo_id: str) -> list[str]:
    org, _, name = repo_id.partition("/")
    return list(dict.fromkeys([repo_id, f"{org}/{name.lower()}"]))


def hf_repo(spec: EncoderSpec) -> str | None:
    """The spec's Hugging Face repo id, when its model_id is one."""
    if spec.library == "torchvision" or not spec.model_id or not _REPO_RE.match(spec.model_id):
        return None
    return spec.model_id


def _from_hf_cache(spec: EncoderSpec, cache_dir: str | os.PathLike | None) -> Path | None:
    repo_id = hf_repo(spec)
    if repo_id is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of the encoder extra
        return None
    for repo in _hf_candidates(repo_id):
        for fname in spec.weight_files:
            try:
                hit = try_to_load_from_cache(repo, fname, cache_dir=cache_dir)
            except ValueError:  # invalid repo id / file name
                continue
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
    return None


def _hf_cache_dir(cache_dir: str | os.PathLike | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"


def _shards(path: Path) -> tuple[Path, ...]:
    """Every file of a sharded checkpoint given its ``*.index.json`` (else empty)."""
    if not path.name.endswith(".index.json"):
        return ()
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsLoadError(f"{path}: not a readable sharded-checkpoint index ({exc})") from exc
    files = tuple(path.parent / f for f in dict.fromkeys(weight_map.values()))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WeightsNotFoundError(f"{path}: shard files missing: {', '.join(missing[:3])}")
    return files


def resolve_weights(
    spec: EncoderSpec,
    weights: WeightsArg = None,
    weights_dir: str | os.PathLike | None = None,
    *,
    hf_cache_dir: str | os.PathLike | None = None,
    use_hf_cache: bool = True,
) -> ResolvedWeights:
    """Find ``spec``'s weights locally, or raise :class:`WeightsNotFoundError` saying how to provide them."""
    explicit = explicit_for(weights, spec.name)
    if explicit is not None:
        path = _in_dir(explicit, spec) if explicit.is_dir() else explicit
        if path is None or not path.is_file():
            raise WeightsNotFoundError(
                f"Weights for patch encoder {spec.name!r} were given as {str(explicit)!r}, but "
                + ("that directory holds no single weights file." if explicit.is_dir() else "it does not exist.")
                + f" Expected {spec.expected_weights()}; fix {_EW} {spec.name}=PATH."
            )
        return ResolvedWeights(path, "explicit", _shards(path))

    tried: list[str] = []
    wdir = weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_DIR_ENV) or None
    if wdir is not None:
        root = Path(wdir).expanduser()
        sub = root / spec.name
        path = _in_dir(sub, spec) if sub.is_dir() else None
        if path is None:
            path = next(
                (root / f"{spec.name}{s}" for s in WEIGHT_SUFFIXES if (root / f"{spec.name}{s}").is_file()),
                None,
            )
        if path is not None:
            return ResolvedWeights(path, "weights_dir", _shards(path))
        tried.append(f"weights dir {root} (no {spec.name}/<file> or {spec.name}.{{safetensors,pt,pth,bin}})")
    else:
        tried.append(f"no weights dir ({_WD} / ${WEIGHTS_DIR_ENV} not set)")

    if spec.packaged_weights is not None:
        path = spec.packaged_weights()
        if path is not None and path.is_file():
            return ResolvedWeights(path, "package")
        tried.append(f"the {spec.weights_package or 'weights'} package (not installed)")

    if use_hf_cache and hf_repo(spec):
        path = _from_hf_cache(spec, hf_cache_dir)
        if path is not None:
            return ResolvedWeights(path, "hf_cache", _shards(path))
        tried.append(f"Hugging Face cache {_hf_cache_dir(hf_cache_dir)} (no {spec.model_id} snapshot)")

    if spec.library == "torchvision":
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        for fname in spec.weight_files:
            if (hub / fname).is_file():
                return ResolvedWeights(hub / fname, "torch_hub")
        tried.append(f"torch hub cache {hub}")

    first = spec.weight_files[0] if spec.weight_files else "model.safetensors"
    fetch = (
        f" or pre-fetch it on a machine with access (`hf download {spec.model_id}`; gated repos need an "
        "accepted licence) so it sits in the local Hugging Face cache"
        if hf_repo(spec)
        else (f" (the files are published at {spec.url})" if spec.url else "")
    )
    raise WeightsNotFoundError(
        f"No local weights for patch encoder {spec.name!r}: expected {spec.expected_weights()}. "
        f"Weights are never downloaded. Looked in: {'; '.join(tried)}. Provide them with "
        f"{_EW} {spec.name}=/path/to/{first}, or {_WD} DIR holding "
        f"{spec.name}/{first} (or set ${WEIGHTS_DIR_ENV}){fetch}."
    )


_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, streamed; memoized per (path, size, mtime) within the process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest
    return digest


def weights_sha256(resolved: ResolvedWeights) -> str:
    """sha256 of the weights file; for sharded checkpoints, of the concatenated shard digests."""
    if not resolved.shards:
        return file_sha256(resolved.path)
    h = hashlib.sha256()
    for f in resolved.shards:
        h.update(file_sha256(f).encode())
    return h.hexdigest()


_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "teacher")


def _read_one(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported the same way
        raise WeightsLoadError(
            f"{path}: cannot be read as a weights-only checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Only tensors are loaded (no pickled code); "
            "convert it to safetensors or a plain state dict."
        ) from exc
    if not isinstance(obj, Mapping):
        raise WeightsLoadError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return dict(obj)


def load_state_dict_file(resolved: ResolvedWeights | str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint (single, sharded, or wrapped in ``state_dict``/``model``/...) into a flat dict."""
    if not isinstance(resolved, ResolvedWeights):
        p = Path(resolved)
        resolved = ResolvedWeights(p, "explicit", _shards(p))
    sd: dict[str, Any] = {}
    for f in resolved.files:
        sd.update(_read_one(f))
    while len(sd) <= 3:  # unwrap {"state_dict": {...}, "epoch": ...}-style containers
        inner = next((sd[k] for k in _CONTAINER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = dict(inner)
    for prefix in ("module.", "backbone."):  # DDP / SSL-trainer wrappers
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsLoadError(f"{resolved.path}: no tensors found in the checkpoint")
    return tensors


def snapshot_config(resolved: ResolvedWeights | None, names: Iterable[str] = CONFIG_FILES) -> dict | None:
    """The JSON config sitting next to the weights (a Hugging Face snapshot), if any."""
    if resolved is None:
        return None
    for name in names:
        cfg = resolved.path.parent / name
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                return data
    return None


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key.startswith(p) or p in key for p in patterns)


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    encoder: str,
    source: str | os.PathLike,
    ignore_unexpected: Iterable[str] = (),
    ignore_missing: Iterable[str] = (),
    assign: bool = False,
) -> None:
    """Load ``state_dict`` into ``model``; any mismatch beyond the ignore lists is a clear error."""
    try:
        result = model.load_state_dict(dict(state_dict), strict=False, assign=assign)
    except RuntimeError as exc:
        raise WeightsLoadError(
            f"{encoder}: weights {source} do not fit the architecture: {' '.join(str(exc).split())[:600]}"
        ) from exc
    missing = [k for k in result.missing_keys if not _matches(k, ignore_missing)]
    unexpected = [k for k in result.unexpected_keys if not _matches(k, ignore_unexpected)]
    if missing or unexpected:
        raise WeightsLoadError(
            f"{encoder}: weights {source} do not match the architecture: {len(missing)} missing "
            f"(e.g. {missing[:4]}), {len(unexpected)} unexpected (e.g. {unexpected[:4]}). "
            "Is this the right file for this encoder?"
        )
