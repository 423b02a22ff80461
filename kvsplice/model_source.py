"""Where models and configs come from: the built-in model, shipped configs, local paths, the hub.

A model that cannot be had fails with one ModelNotFound line that names the problem and the fix:
a path that is a file or has no config.json, a hub id while HF_HUB_OFFLINE=1 (at once), or a hub
that does not answer (within HUB_TIMEOUT_S, instead of a minute of retries per file; a copy in
the local cache is used then).
"""
from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

DATA_DIR = Path(__file__).parent / "data"
BUILTIN_NAME = "builtin"
BUILTIN_MODEL_DIR = DATA_DIR / "models" / "kvsplice-tiny"
SHIPPED_CONFIGS = {
    "deepseek-v2-lite": DATA_DIR / "configs" / "deepseek-v2-lite.json",
    "deepseek-v2": DATA_DIR / "configs" / "deepseek-v2.json",
}
# Hub ids whose config ships with the package, so sizing works offline.
_HUB_ALIASES = {"deepseek-ai/DeepSeek-V2-Lite": "deepseek-v2-lite", "deepseek-ai/DeepSeek-V2": "deepseek-v2"}
HUB_TIMEOUT_S = 8.0  # for the one request that tells whether the hub is there at all
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_TRUTHY = {"1", "on", "yes", "true"}

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelNotFound(OSError):
    """A model or config could not be found locally nor fetched."""


def resolve_model_path(model: str) -> str:
    """'builtin' -> the shipped model dir; a local dir stays; anything else is taken as a hub id."""
    if model == BUILTIN_NAME:
        return str(BUILTIN_MODEL_DIR)
    return model


def served_name(model: str) -> str:
    return "kvsplice-tiny" if model == BUILTIN_NAME else model


def shipped_config_name(source: str) -> str | None:
    """The shipped config for `source` (a shipped name or its hub id), or None."""
    name = _HUB_ALIASES.get(source, source)
    return name if name in SHIPPED_CONFIGS else None


def load_config(source: str, trust_remote_code: bool = False):
    """A transformers config from a shipped name, a config.json file, a model dir or a hub id."""
    from transformers import AutoConfig

    name = shipped_config_name(source)
    if name is not None:
        return AutoConfig.from_pretrained(str(SHIPPED_CONFIGS[name]))
    path = Path(resolve_model_path(source))
    if path.is_file() or path.is_dir():
        return _local(lambda: AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code), source)
    return _from_hub(lambda local_only: AutoConfig.from_pretrained(
        source, trust_remote_code=trust_remote_code, local_files_only=local_only), source)


def position_limit(config) -> tuple[int, str]:
    """(positions the model can attend over, where that number comes from), counting RoPE scaling.

    As vLLM reads it: YaRN extends original_max_position_embeddings by `factor`, linear and dynamic
    scaling extend max_position_embeddings by it, and llama3 / longrope configs state the extended
    length in max_position_embeddings already.
    """
    limit = int(config.max_position_embeddings)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind, factor = rope.get("rope_type") or rope.get("type"), rope.get("factor")
    if not factor or kind in (None, "default", "llama3", "longrope", "su"):
        return limit, "max_position_embeddings"
    if kind == "yarn" and rope.get("original_max_position_embeddings"):
        scaled = int(rope["original_max_position_embeddings"] * factor)
        base = "original_max_position_embeddings"
    else:
        scaled, base = int(limit * factor), "max_position_embeddings"
    if scaled <= limit:
        return limit, "max_position_embeddings"
    return scaled, f"{base} x {kind} RoPE factor {factor:g}"


def load_pretrained(source: str, dtype, device: str = "cpu", trust_remote_code: bool = False,
                    device_map: dict | None = None):
    """(model, tokenizer) through transformers from a local path, 'builtin' or a hub id; with a
    `device_map` each module loads straight onto its device (a model larger than one GPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(source)

    def load(local_only: bool = False):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                  local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     device_map=device_map, local_files_only=local_only)
        return model, tokenizer

    if Path(path).exists():
        _check_model_dir(Path(path), source)
        model, tokenizer = _local(load, source)
    else:
        model, tokenizer = _from_hub(load, source)
    if device_map is None:
        model = model.to(torch.device(device))
    return model.eval(), tokenizer


# ---------------------------------------------------------------- local paths


def _check_model_dir(path: Path, source: str) -> None:
    if path.is_file():
        raise ModelNotFound(f"model {source!r} is a file, not a model directory: pass a directory with config.json "
                            "and the weights, a hub id (org/name), or 'builtin'")
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"model directory {source!r} has no config.json: pass the directory that holds the "
                            "model's config.json, tokenizer and weights")


def _local(load: Callable[[], T], source: str) -> T:
    """A load from a local path, with its failure in one line (transformers' messages run to paragraphs)."""
    try:
        return load()
    except ModelNotFound:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises for a broken directory
        raise ModelNotFound(f"could not load the model at {source!r}: {_first_line(exc)}") from exc


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1


# ---------------------------------------------------------------- the hub


def hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in _TRUTHY for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_OFFLINE = ("HF_HUB_OFFLINE=1 is set, so the hub is not asked",
            "download the model elsewhere and pass its local path, or unset HF_HUB_OFFLINE")
_UNREACHABLE_FIX = "check the network (or HTTPS_PROXY / HF_ENDPOINT), set HF_HUB_OFFLINE=1 to use the local cache, " \
                   "or pass a local path"


def check_available(source: str) -> None:
    """The cheap half of loading, without torch or transformers (seconds to import): a model that
    cannot be had fails now, in one ModelNotFound line. The hub's answer is remembered for the load."""
    path = Path(resolve_model_path(source))
    if path.exists():
        _check_model_dir(path, source)
        return
    _check_hub_id(source)
    why, fix = _OFFLINE if hub_offline() else (probe_hub(source), _UNREACHABLE_FIX)
    if why is not None and not _config_cached(source):
        raise _not_cached(source, why, fix)


def _check_hub_id(source: str) -> None:
    if _looks_like_path(source) or not _HUB_ID.fullmatch(source):
        raise ModelNotFound(f"model {source!r}: no such file or directory, and not a hub id (org/name); "
                            "pass an existing model directory, a hub id, or 'builtin'")


def _config_cached(source: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(source, "config.json"), str)


def _not_cached(source: str, why: str, fix: str) -> ModelNotFound:
    return ModelNotFound(f"could not load {source!r}: {why}, and it is not in the local Hugging Face cache; {fix}")


def _from_hub(load: Callable[[bool], T], source: str) -> T:
    """A load of hub id `source`: load(local_only) is called with True to read only the local cache."""
    _check_hub_id(source)
    if hub_offline():
        return _cached_or_fail(load, source, *_OFFLINE)
    problem = probe_hub(source)
    if problem is not None:
        return _cached_or_fail(load, source, problem, _UNREACHABLE_FIX)
    try:
        return load(False)
    except Exception as exc:  # noqa: BLE001 - the hub answered, then a download or the files failed
        raise ModelNotFound(f"could not load {source!r} from the hub: {_first_line(exc)}") from exc


def _cached_or_fail(load: Callable[[bool], T], source: str, why: str, fix: str) -> T:
    try:
        result = load(True)
    except Exception as exc:  # noqa: BLE001 - not (wholly) in the local cache
        log.debug("no usable cached copy of %s", source, exc_info=True)
        raise _not_cached(source, why, fix) from exc
    log.warning("using the cached copy of %s: %s", source, why)
    return result


@functools.lru_cache(maxsize=8)  # start-up asks before and while loading: one probe, one wait at most
def probe_hub(source: str) -> str | None:
    """None if the hub has `source`; else why not, in a few words. One request, HUB_TIMEOUT_S at most."""
    import httpx
    from huggingface_hub import constants, get_token

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    token = get_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{endpoint.rstrip('/')}/api/models/{source}"
    silent = f"the hub at {endpoint} did not answer within {HUB_TIMEOUT_S:g}s"
    try:
        response = _within(HUB_TIMEOUT_S, lambda: httpx.get(url, headers=headers, timeout=HUB_TIMEOUT_S))
    except (httpx.TimeoutException, TimeoutError):
        return silent
    except httpx.HTTPError as exc:
        return f"the hub at {endpoint} cannot be reached ({type(exc).__name__}: {_first_line(exc)})"
    if response.status_code in (401, 403, 404):
        raise ModelNotFound(f"the hub has no model {source!r} that this machine may read (HTTP {response.status_code}): "
                            "check the id, and for a gated or private model set HF_TOKEN")
    if response.status_code >= 400:
        return f"the hub at {endpoint} answered HTTP {response.status_code}"
    return None


def _within(seconds: float, call: Callable[[], T]) -> T:
    """call(), or TimeoutError after `seconds`. httpx's timeouts do not cover name resolution, which
    a broken resolver can stretch to many times that; the call goes on in a daemon thread that
    the process does not wait for."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, call()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            result.append((False, exc))

    worker = threading.Thread(target=run, name="kvsplice-hub-probe", daemon=True)
    worker.start()
    worker.join(seconds + 0.5)  # httpx's own timeout answers first when it applies
    if not result:
        raise TimeoutError(f"no answer within {seconds:g}s")
    ok, value = result[0]
    if not ok:
        raise value
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
