"""Where models and configs come from: the built-in model, shipped configs, local paths, the hub.

Offline (HF_HUB_OFFLINE=1 or no network) a hub id must fail at once with a message that says what
to do, never after a minute of retries.
"""
from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
BUILTIN_NAME = "builtin"
BUILTIN_MODEL_DIR = DATA_DIR / "models" / "kvsplice-tiny"
SHIPPED_CONFIGS = {
    "deepseek-v2-lite": DATA_DIR / "configs" / "deepseek-v2-lite.json",
    "deepseek-v2": DATA_DIR / "configs" / "deepseek-v2.json",
}
# Hub ids whose config ships with the package, so sizing works offline.
_HUB_ALIASES = {"deepseek-ai/DeepSeek-V2-Lite": "deepseek-v2-lite", "deepseek-ai/DeepSeek-V2": "deepseek-v2"}


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
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return _from_hub(lambda: AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code), source)


def _from_hub(load, source: str):
    """Run a hub load; turn the offline/not-found OSError into one clear message."""
    try:
        return load()
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "HF_HUB_OFFLINE=1 is set, so the hub was not asked; download the model elsewhere and pass its local path"
            if offline
            else "check the id, your network and HF_TOKEN, or pass a local path"
        )
        raise ModelNotFound(f"could not load {source!r}: not a local path, and the hub failed ({hint}): {exc}") from exc


def load_pretrained(source: str, dtype, device: str = "cpu", trust_remote_code: bool = False,
                    device_map: dict | None = None):
    """(model, tokenizer) through transformers from a local path, 'builtin' or a hub id; with a
    `device_map` each module loads straight onto its device (a model larger than one GPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(source)

    def load():
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     device_map=device_map)
        return model, tokenizer

    model, tokenizer = load() if Path(path).exists() else _from_hub(load, source)
    if device_map is None:
        model = model.to(torch.device(device))
    return model.eval(), tokenizer
