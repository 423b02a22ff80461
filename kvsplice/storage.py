"""Save and load a model's per-layer splices as one small safetensors file with metadata.

The metadata says what the splices are for (model identity, layer count, dims, ratio, init), so a
file calibrated on one model is refused by another instead of silently degrading it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kvsplice.patch import find_mla_layers
from kvsplice.splice import LearnedKVSplice

FORMAT = "kvsplice-splices"
FORMAT_VERSION = "1"
_ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "vocab_size")


class SpliceFileMismatch(ValueError):
    """The splice file does not belong to this model."""


def architecture_of(config) -> dict:
    return {name: getattr(config, name, None) for name in _ARCH_FIELDS}


FINGERPRINT_WEIGHT = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # its checkpoint name


@torch.no_grad()
def fingerprint(config, kv_a_weight: torch.Tensor) -> str:
    """A short hash of the architecture and of the first MLA down-projection's weights.

    Weights are rounded to bf16 first so the same checkpoint loaded in fp32 or bf16 matches. Any
    loader can compute it: transformers' model (`model_fingerprint`) or the serving engine, which
    reads FINGERPRINT_WEIGHT from the checkpoint.
    """
    sample = kv_a_weight.detach().flatten()[:4096].to(device="cpu", dtype=torch.bfloat16).float()
    h = hashlib.sha256(json.dumps(architecture_of(config), sort_keys=True).encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module, layer_pattern: str = "model.layers") -> str:
    """`fingerprint` of a transformers model (patched or not)."""
    attn = find_mla_layers(model, layer_pattern)[0]
    proj = attn.kv_a_proj_with_mqa
    weight = getattr(proj, "kv_a_proj", proj).weight  # unwrap a patched encoder
    return fingerprint(model.config, weight)


def save_splices(
    path: str | Path, splices: Sequence[LearnedKVSplice], model: nn.Module, extra: dict | None = None
) -> Path:
    """Write all layers' splices to `path` (safetensors) with what identifies their model."""
    if not splices:
        raise ValueError("no splices to save")
    first = splices[0]
    tensors = {
        f"layers.{i}.{name}": t.detach().to("cpu").contiguous()
        for i, splice in enumerate(splices)
        for name, t in splice.state_dict().items()
    }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "compression_ratio": repr(first.compression_ratio),
        "rank": str(first.rank),
        "latent_dim": str(first.latent_dim),
        "num_layers": str(len(splices)),
        "init": first.init_method,
        "use_layernorm": str(first.use_layernorm),
        "use_transform": str(first.use_transform),
        "model_name": str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")),
        "model_fingerprint": model_fingerprint(model),
        "architecture": json.dumps(architecture_of(model.config), sort_keys=True),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_splice_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"splice file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise SpliceFileMismatch(f"{path} is not a KVSplice splice file (metadata format={meta.get('format')!r})")
    return meta


def load_splices(path: str | Path, model: nn.Module | None = None, strict: bool = True, *,
                 config=None, model_fingerprint_value: str | None = None) -> list[LearnedKVSplice]:
    """Read splices back. With `model` (a transformers model), or with `config` and the fingerprint
    of the weights they will serve, refuse a file made for another model (strict=False skips the
    weight fingerprint check but never the architecture check)."""
    meta = read_splice_metadata(path)
    if model is not None:
        config, model_fingerprint_value = model.config, model_fingerprint(model)
    if config is not None:
        _check_matches(meta, config, model_fingerprint_value if strict else None, path)
    splices = []
    with safe_open(str(path), framework="pt") as f:
        keys = f.keys()
        for i in range(int(meta["num_layers"])):
            splice = LearnedKVSplice(
                int(meta["latent_dim"]),
                float(meta["compression_ratio"]),
                use_layernorm=meta["use_layernorm"] == "True",
                use_transform=meta["use_transform"] == "True",
            )
            prefix = f"layers.{i}."
            state = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
            splice.load_state_dict(state)
            splice.init_method = meta["init"]
            splices.append(splice)
    return splices


def _check_matches(meta: dict, config, weights_fingerprint: str | None, path) -> None:
    arch = architecture_of(config)
    saved_arch = json.loads(meta["architecture"])
    diffs = {k: (saved_arch.get(k), v) for k, v in arch.items() if saved_arch.get(k) != v}
    if diffs:
        detail = ", ".join(f"{k}: file {a} vs model {b}" for k, (a, b) in diffs.items())
        raise SpliceFileMismatch(f"{path} was made for another model architecture ({detail})")
    if weights_fingerprint is not None and meta["model_fingerprint"] != weights_fingerprint:
        raise SpliceFileMismatch(
            f"{path} was calibrated on another model ({meta.get('model_name') or 'unnamed'}, fingerprint "
            f"{meta['model_fingerprint']}), not this one ({weights_fingerprint}); recalibrate, or load "
            "with strict=False to use it anyway"
        )
