"""Hugging Face hub access: the HF cache first, one quick probe, then a download; one clear error line otherwise.

The environment (HF_HUB_OFFLINE, HF_HOME, HF_HUB_CACHE, HF_ENDPOINT) is read at call time, so a setting made
after huggingface_hub was imported still counts.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .sources import HF_REVISION

HUB_TIMEOUT_S = 10.0


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hf_offline() -> bool:
    # Read the environment at call time: huggingface_hub freezes its constants at import.
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def cache_dir() -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_endpoint() -> str | None:
    # HF_ENDPOINT (a mirror) is honoured even when set after huggingface_hub was imported.
    return os.environ.get("HF_ENDPOINT") or None


def _is_network_error(err: Exception) -> bool:
    mod = type(err).__module__.split(".")[0]
    return isinstance(err, OSError) or mod in ("httpx", "httpx2", "httpcore", "requests", "urllib3", "huggingface_hub")


def hub_error(repo: str, what: str, reason: str, key: str = "model.model_source", fix: str | None = None) -> UserError:
    fix = fix or (
        "set model.text_encoder to a local folder with text_encoder/ + tokenizer/ (or a T5 folder)"
        if key == "model.text_encoder"
        else "point model.model_source at a local .safetensors file or diffusers folder"
    )
    return UserError(
        f"{key}: cannot get {what} from the Hugging Face repo {repo} ({reason}); run once with network access "
        f"to download it into the HF cache ({cache_dir()}), or {fix}"
    )


def _probe_hub(repo: str, filename: str, what: str, key: str = "model.model_source", fix: str | None = None) -> None:
    """One HEAD request without retries, so a machine without network fails in seconds, not minutes."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        url = hf_hub_url(repo, filename, revision=HF_REVISION, endpoint=_hf_endpoint())
        get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S)
    except Exception as err:
        if not _is_network_error(err):
            raise
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            reason = f"access denied (HTTP {status}): log in with `hf auth login` or set HF_TOKEN"
        elif status == 404:
            reason = "file not found in the repo (HTTP 404)"
        else:
            reason = f"no connection: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip()
        raise hub_error(repo, what, reason, key, fix) from None


def hf_file(repo: str, filename: str) -> Path:
    """The local path of one repo file: from the HF cache, downloading it once if needed."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cache = cache_dir()
    cached = try_to_load_from_cache(repo, filename, cache_dir=str(cache), revision=HF_REVISION)
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached)
    if _hf_offline():
        raise hub_error(repo, filename, "HF_HUB_OFFLINE is set and the file is not in the HF cache")
    _probe_hub(repo, filename, filename)
    try:
        return Path(
            hf_hub_download(repo, filename, revision=HF_REVISION, cache_dir=str(cache), endpoint=_hf_endpoint())
        )
    except Exception as err:
        if not _is_network_error(err):
            raise
        raise hub_error(repo, filename, f"{type(err).__name__}: {err}".splitlines()[0]) from None


def hf_folder(repo: str, patterns: list[str], complete, what: str, key: str, fix: str | None = None) -> Path:
    """The files of `repo` matching `patterns` (a snapshot folder), from the cache or downloaded once.
    `complete(folder) -> bool` says whether a cached snapshot has what is needed; `fix`: how to do without the hub."""
    from huggingface_hub import snapshot_download

    kwargs = dict(allow_patterns=patterns, revision=HF_REVISION, cache_dir=str(cache_dir()))
    try:
        folder = Path(snapshot_download(repo, local_files_only=True, **kwargs))
        if complete(folder):
            return folder
    except Exception as err:
        if not _is_network_error(err):
            raise
    if _hf_offline():
        raise hub_error(repo, what, "HF_HUB_OFFLINE is set and it is not in the HF cache", key, fix)
    _probe_hub(repo, patterns[0].replace("*", "config.json"), what, key, fix)
    try:
        return Path(snapshot_download(repo, endpoint=_hf_endpoint(), **kwargs))
    except Exception as err:
        if not _is_network_error(err):
            raise
        raise hub_error(repo, what, f"{type(err).__name__}: {err}".splitlines()[0], key, fix) from None
