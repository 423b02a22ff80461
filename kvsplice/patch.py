"""Patch a transformers DeepSeek-V2 model so its KV cache holds the splice code, not the latent.

transformers' `DeepseekV2Attention` computes `kv_a_proj_with_mqa(x) -> [latent | k_pe]`, normalises
the latent with `kv_a_layernorm`, caches `(latent, k_pe)` and expands the cached latents through
`kv_b_proj`. The patch swaps three of its modules and leaves its forward untouched:

    kv_a_proj_with_mqa -> SpliceEncoder: [encode(kv_a_layernorm(latent)) | k_pe]   (r + rope wide)
    kv_a_layernorm     -> Identity       (the norm now happens inside the encoder)
    kv_b_proj          -> SpliceDecoder: kv_b_proj(decode(code))
    kv_lora_rank       -> r              (the width the forward splits off and caches)

so `past_key_values` stores the r-wide code and `generate` really holds less KV memory. The
decoder applies the read path explicitly (differentiable, used for fine-tuning and as the
reference); the serving engine folds it into the up-projection instead.

With `kv_cache_dtype="fp8"` the code is also rounded as the engine's fp8 cache stores it
(`kv_quant.fake_quantize`: per-token scale, round, read back), at every ratio: at 1.0 the latent
norm is wrapped instead (`QuantizedLatentNorm`). `bf16` rounds to bfloat16 in a float32 model. The values stay in the model dtype, so this
measures what fp8 storage costs in quality, not the memory it saves.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from kvsplice.kv_quant import storage_quantizer
from kvsplice.splice import LearnedKVSplice

Quantizer = Callable[[torch.Tensor], torch.Tensor]  # code -> the code as the cache gives it back

SUPPORTED_MODEL_TYPES = ("deepseek_v2",)
DEFAULT_LAYER_PATTERN = "model.layers"
_MLA_MODULES = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")


class SpliceEncoder(nn.Module):
    """Stands in for `kv_a_proj_with_mqa`: outputs the splice code instead of the raw latent."""

    def __init__(self, kv_a_proj: nn.Module, kv_a_layernorm: nn.Module, splice: LearnedKVSplice,
                 quantize: Quantizer | None = None) -> None:
        super().__init__()
        self.kv_a_proj = kv_a_proj
        self.kv_a_layernorm = kv_a_layernorm
        self.splice = splice
        self.quantize = quantize

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        latent, k_pe = split_latent(self.kv_a_proj(hidden_states), self.splice.latent_dim)
        code = self.splice.encode(self.kv_a_layernorm(latent))
        if self.quantize is not None:
            code = self.quantize(code)
        rank, rope = code.shape[-1], k_pe.shape[-1]
        # transformers splits k_pe off this output and views it as complex numbers, which needs an
        # even storage offset and row stride: with an odd rank, write it one element into a buffer.
        shift = rank % 2
        out = code.new_empty(*code.shape[:-1], shift + rank + rope)[..., shift:]
        out[..., :rank] = code
        out[..., rank:] = k_pe
        return out


class QuantizedLatentNorm(nn.Module):
    """Stands in for `kv_a_layernorm` without a splice: the normalised latent as the cache stores it."""

    def __init__(self, kv_a_layernorm: nn.Module, quantize: Quantizer) -> None:
        super().__init__()
        self.kv_a_layernorm = kv_a_layernorm
        self.quantize = quantize

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.kv_a_layernorm(latent))


class SpliceDecoder(nn.Module):
    """Stands in for `kv_b_proj`: reads the cached code back to the latent, then up-projects."""

    def __init__(self, kv_b_proj: nn.Linear, splice: LearnedKVSplice) -> None:
        super().__init__()
        self.kv_b_proj = kv_b_proj
        self.splice = splice

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.kv_b_proj(self.splice.decode(code))


def split_latent(compressed_kv: torch.Tensor, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`kv_a_proj_with_mqa` output -> (latent, k_pe before RoPE)."""
    return compressed_kv[..., :latent_dim], compressed_kv[..., latent_dim:]


def _resolve(root: nn.Module, dotted: str) -> object | None:
    obj: object = root
    for name in dotted.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def find_mla_layers(model: nn.Module, layer_pattern: str | None = None) -> list[nn.Module]:
    """The attention modules of an MLA model, with errors that say what was looked for."""
    config = getattr(model, "config", None)
    if getattr(config, "kv_lora_rank", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no MLA latent cache: config.kv_lora_rank not found "
            f"(model_type={getattr(config, 'model_type', None)!r}); KVSplice needs a DeepSeek-V2 style model"
        )
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {config.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    pattern = layer_pattern or DEFAULT_LAYER_PATTERN
    layers = _resolve(model, pattern)
    if not isinstance(layers, (nn.ModuleList, list, tuple)) or len(layers) == 0:
        raise ValueError(f"layer_pattern {pattern!r} found no list of layers in {type(model).__name__}")
    attentions = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        missing = [m for m in _MLA_MODULES if not hasattr(attn, m)]
        if attn is None or missing:
            raise ValueError(
                f"layer {i} under {pattern!r} has no MLA attention: expected layer.self_attn with {_MLA_MODULES}"
            )
        attentions.append(attn)
    return attentions


def make_splices(
    config, compression_ratio: float, init: str = "truncate", use_layernorm: bool = False, seed: int = 0
) -> list[LearnedKVSplice]:
    """One data-free splice per layer (`truncate` or `orthogonal`); `pca` needs calibration data."""
    splices = []
    for layer in range(config.num_hidden_layers):
        splice = LearnedKVSplice(config.kv_lora_rank, compression_ratio, use_layernorm=use_layernorm)
        if init == "orthogonal":
            splice.init_orthogonal(seed=seed + layer)
        elif init != "truncate":
            raise ValueError(f"init {init!r} needs calibration data or is unknown; data-free inits: truncate, orthogonal")
        splices.append(splice)
    return splices


def is_patched(model: nn.Module) -> bool:
    return bool(getattr(model, "kvsplice_patched", False))


def patch_model_with_kvsplice(
    model: nn.Module,
    compression_ratio: float = 0.5,
    layer_pattern: str | None = None,
    use_layernorm: bool = False,
    splices: Sequence[LearnedKVSplice] | None = None,
    init: str = "truncate",
    kv_cache_dtype: str = "auto",
) -> nn.Module:
    """Make the model cache r = round(ratio * kv_lora_rank) code dims per token instead of the latent.

    `splices` (one per layer, e.g. from `load_splices` or calibration) wins over `init`. Ratio 1.0
    without splices is plain MLA: the model is left as it is, unless `kv_cache_dtype` names a
    storage that rounds the cached code (spliced or not) as the engine's cache does: fp8, or bf16
    in a float32 model. Returns the
    model, patched in place; `unpatch_model` undoes it.
    """
    attentions = find_mla_layers(model, layer_pattern)
    if is_patched(model):
        raise ValueError("model is already patched with KVSplice; call unpatch_model first")
    param = next(model.parameters())
    quantize = storage_quantizer(kv_cache_dtype, param.dtype)
    if splices is None and compression_ratio != 1.0:
        splices = make_splices(model.config, compression_ratio, init, use_layernorm)
    if splices is None and quantize is None:
        return model
    if splices is not None and len(splices) != len(attentions):
        raise ValueError(f"got {len(splices)} splices for {len(attentions)} MLA layers")
    for i, attn in enumerate(attentions):
        if splices is None:
            attn.kv_a_layernorm = QuantizedLatentNorm(attn.kv_a_layernorm, quantize)
            attn.kvsplice = None
        else:
            _patch_attention(attn, splices[i].to(device=param.device, dtype=param.dtype), quantize)
    model.kvsplice_patched = True
    model.kvsplice_layer_pattern = layer_pattern
    return model


def _patch_attention(attn: nn.Module, splice: LearnedKVSplice, quantize: Quantizer | None) -> None:
    if splice.latent_dim != attn.kv_lora_rank:
        raise ValueError(f"splice latent_dim {splice.latent_dim} != the model's kv_lora_rank {attn.kv_lora_rank}")
    attn.kv_a_proj_with_mqa = SpliceEncoder(attn.kv_a_proj_with_mqa, attn.kv_a_layernorm, splice, quantize)
    attn.kv_a_layernorm = nn.Identity()
    attn.kv_b_proj = SpliceDecoder(attn.kv_b_proj, splice)
    attn.kv_lora_rank = splice.rank
    attn.kvsplice = splice


def unpatch_model(model: nn.Module) -> nn.Module:
    """Restore the original attention modules (the splices and any fp8 rounding are dropped)."""
    if not is_patched(model):
        return model
    for attn in find_mla_layers(model, model.kvsplice_layer_pattern):
        if isinstance(attn.kv_a_layernorm, QuantizedLatentNorm):
            attn.kv_a_layernorm = attn.kv_a_layernorm.kv_a_layernorm
        else:
            encoder, decoder = attn.kv_a_proj_with_mqa, attn.kv_b_proj
            attn.kv_a_proj_with_mqa = encoder.kv_a_proj
            attn.kv_a_layernorm = encoder.kv_a_layernorm
            attn.kv_b_proj = decoder.kv_b_proj
            attn.kv_lora_rank = encoder.splice.latent_dim
        del attn.kvsplice
    model.kvsplice_patched = False
    return model


def get_splices(model: nn.Module) -> list[LearnedKVSplice]:
    """The per-layer splices of a patched model (empty when it is not patched or has none)."""
    if not is_patched(model):
        return []
    splices = [attn.kvsplice for attn in find_mla_layers(model, model.kvsplice_layer_pattern)]
    return [] if None in splices else splices
