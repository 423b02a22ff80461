"""Collect MLA latents from real text and fit splices to them (PCA)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from kvsplice.patch import find_mla_layers, is_patched
from kvsplice.splice import LearnedKVSplice


@torch.no_grad()
def collect_latents(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    max_tokens: int | None = None,
    layer_pattern: str | None = None,
    desc: str | None = None,
) -> list[torch.Tensor]:
    """Run the (unpatched) model on token batches and return each layer's latents [n, kv_lora_rank]
    (the output of kv_a_layernorm: exactly what MLA caches), in float32 on the CPU. With `desc`,
    a progress bar counts the batches."""
    if is_patched(model):
        raise ValueError("collect latents on the unpatched model: a patched one no longer exposes the latent")
    attentions = find_mla_layers(model, layer_pattern)
    store: list[list[torch.Tensor]] = [[] for _ in attentions]
    hooks = [
        attn.kv_a_layernorm.register_forward_hook(
            lambda _m, _inp, out, i=i: store[i].append(out.detach().reshape(-1, out.shape[-1]).float().cpu())
        )
        for i, attn in enumerate(attentions)
    ]
    device = next(model.parameters()).device
    seen = 0
    try:
        for input_ids in tqdm(batches, desc=desc, unit="batch", leave=False, disable=desc is None):
            model(input_ids=input_ids.to(device), use_cache=False)
            seen += input_ids.numel()
            if max_tokens is not None and seen >= max_tokens:
                break
    finally:
        for h in hooks:
            h.remove()
    latents = [torch.cat(chunks)[:max_tokens] for chunks in store]
    if not latents[0].numel():
        raise ValueError("no calibration tokens were seen")
    return latents


def pca_splices(latents: list[torch.Tensor], compression_ratio: float, use_layernorm: bool = False,
                progress: bool = False) -> list[LearnedKVSplice]:
    """One PCA-initialised splice per layer from that layer's latents."""
    splices = []
    for layer_latents in tqdm(latents, desc="PCA per layer", unit="layer", leave=False, disable=not progress):
        splice = LearnedKVSplice(layer_latents.shape[-1], compression_ratio, use_layernorm=use_layernorm)
        splice.init_pca(layer_latents)
        splices.append(splice)
    return splices


@torch.no_grad()
def reconstruction_error(splice: LearnedKVSplice, latents: torch.Tensor) -> float:
    """Relative squared error ||c - decode(encode(c))||^2 / ||c||^2 on the given latents."""
    splice = splice.float()
    x = latents.float()
    return float(((splice(x) - x) ** 2).sum() / (x**2).sum())
