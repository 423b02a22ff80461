"""Prepare and store one MLA layer's cache entries in one kernel: latent RMSNorm (or the splice
code), RoPE on the key and the queries, the scatter into the paged cache.

Per token t (inputs are views into one fused projection output: rows strided, last dim contiguous):
    rstd = rsqrt(mean(latent.float()**2) + eps)                       (kv_a_layernorm's statistic)
    code = norm_weight * latent * rstd                                 no splice: C = L
    code = z_raw * rstd + z_bias  [then LayerNorm over r, optional]    splice:    C = r
    k_rot = rope(k_pe), q_pe <- rope(q_pe) IN PLACE (every head)
    kv_cache[slot_mapping[t]] = [code | k_rot]                        model-dtype cache
    kv_cache[slot_mapping[t]] = [fp8(code / s) | s | k_rot], s = amax|code| / FP8_MAX     fp8 cache
    stored[t] = [code as the cache gives it back | k_rot], model dtype
RoPE rotates interleaved pairs (x[2i], x[2i+1]) by the angle whose cos/sin are cos[pos, i] and
sin[pos, i] (already times the attention scaling): (a, b) -> (a cos - b sin, a sin + b cos), which
is transformers' DeepSeek-V2 `apply_rotary_emb` (a complex product) written out.
Why z_raw * rstd works: the splice encode z = W_c rmsnorm(c) + b is linear after the norm, so
the model folds W_c diag(norm_weight) into the latent down-projection and only the per-token
1 / rms is left; the latent itself is still needed for that statistic.
The code is computed in fp32 and rounded once to the cache dtype (transformers' kv_a_layernorm
rounds the normalised latent to the input dtype before the weight multiply; the two differ by
at most one bf16 rounding). Rotated queries are rounded to q_pe's dtype. An fp8 cache
(kvsplice.kv_quant) gets the code quantized here, with its per-token scale, from the fp32 code
in registers; `stored` then holds the dequantized code, so a fresh prefill attends over exactly
the values later steps read from the cache.

Work mapping: one program per token. It reads the latent row (L values) and z_raw (r), computes
the code in registers, rotates k_pe (P/2 pairs, loaded as even and odd lanes), writes the entry
to its cache slot and to `stored`, then rotates the token's queries BLOCK_H heads at a time.
Traffic: (L [+ r] + P + 2 NH P) reads, (C + P) * 2 + NH P writes per token; no reuse.
Every slot must be valid (padding tokens point at a scratch block); two tokens with the same
slot race (the last writer is unspecified). No host syncs: graph-capturable once compiled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvsplice.cache_layout import CacheViews
from kvsplice.kv_quant import MIN_SCALE, dequantize, fp8_max, quantize
from server.kernels.triton_utils import check_last_dim_contiguous, jit, pad_dim, tl, use_triton

MAX_HEAD_BLOCK = 16  # query heads rotated per loop step: 16 x 32 pairs x 2 values in registers


@dataclass(frozen=True)
class _Dims:
    tokens: int
    latent: int  # L
    code: int  # C = L or r
    rope: int  # P
    heads: int  # NH


# ----------------------------------------------------------------------------- torch reference

def rotate_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on interleaved pairs, fp32: x [..., P], cos/sin broadcastable to [..., P/2]."""
    x = x.float()
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def mla_code_torch(latent: Tensor, eps: float, norm_weight: Tensor | None = None, z_raw: Tensor | None = None,
                   z_bias: Tensor | None = None, code_norm_weight: Tensor | None = None,
                   code_norm_bias: Tensor | None = None, code_norm_eps: float = 1e-5) -> Tensor:
    """The code part of the cache entry, fp32 [T, C] (module docstring)."""
    lat = latent.float()
    rstd = torch.rsqrt(lat.pow(2).mean(-1, keepdim=True) + eps)
    if z_raw is None:
        return norm_weight.float() * lat * rstd
    code = z_raw.float() * rstd
    if z_bias is not None:
        code = code + z_bias.float()
    if code_norm_weight is not None:
        code = F.layer_norm(code, (code.shape[-1],), code_norm_weight.float(),
                            None if code_norm_bias is None else code_norm_bias.float(), code_norm_eps)
    return code


def mla_write_kv_torch(
    latent: Tensor, k_pe: Tensor, q_pe: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
    kv_cache: Tensor | CacheViews, slot_mapping: Tensor, *, norm_weight: Tensor | None = None, eps: float = 1e-6,
    z_raw: Tensor | None = None, z_bias: Tensor | None = None, code_norm_weight: Tensor | None = None,
    code_norm_bias: Tensor | None = None, code_norm_eps: float = 1e-5, stored: Tensor | None = None,
) -> Tensor:
    """Reference of `mla_write_kv`, any device; same arguments and effects."""
    cache = _views(kv_cache, latent, z_raw)
    _check(latent, k_pe, q_pe, positions, cos, sin, cache, slot_mapping, norm_weight, z_raw, stored)
    code = mla_code_torch(latent, eps, norm_weight, z_raw, z_bias, code_norm_weight, code_norm_bias, code_norm_eps)
    c, s = cos[positions].float(), sin[positions].float()  # [T, P/2]
    q_pe.copy_(rotate_interleaved(q_pe, c[:, None], s[:, None]))
    k_rot = rotate_interleaved(k_pe, c, s).to(cache.rope.dtype)
    blocks, offsets = slot_mapping // cache.block_size, slot_mapping % cache.block_size
    if cache.quantized:
        values, scale = quantize(code, cache.code.dtype)
        cache.code[blocks, offsets], cache.scale[blocks, offsets] = values, scale
        code = dequantize(values, scale)
    else:
        cache.code[blocks, offsets] = code.to(cache.code.dtype)
    cache.rope[blocks, offsets] = k_rot
    entry = torch.cat([code.to(k_rot.dtype), k_rot], dim=-1)
    return entry if stored is None else stored.copy_(entry)


def _views(kv_cache: Tensor | CacheViews, latent: Tensor, z_raw: Tensor | None) -> CacheViews:
    return CacheViews.of(kv_cache, latent.shape[1] if z_raw is None else z_raw.shape[1])


# ----------------------------------------------------------------------------- Triton kernel

@jit
def _rotate_pairs(ptr, half, half_ok, c, s):
    """Load interleaved pairs at ptr + 2*half (+1), return the rotated (even, odd) lanes in fp32."""
    a = tl.load(ptr + 2 * half, mask=half_ok, other=0.0).to(tl.float32)
    b = tl.load(ptr + 2 * half + 1, mask=half_ok, other=0.0).to(tl.float32)
    return a * c - b * s, a * s + b * c


@jit
def _code(latent_row, z_row, nw_ptr, zb_ptr, lnw_ptr, lnb_ptr, eps, ln_eps,
          L: tl.constexpr, C: tl.constexpr, L_PAD: tl.constexpr, C_PAD: tl.constexpr,
          SPLICE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LN: tl.constexpr, HAS_LN_BIAS: tl.constexpr):
    """fp32 [C_PAD] code of one token (zeros past C)."""
    offs_l = tl.arange(0, L_PAD)
    lat = tl.load(latent_row + offs_l, mask=offs_l < L, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(lat * lat, axis=0) / L + eps)
    if SPLICE:
        cols = tl.arange(0, C_PAD)
        ok = cols < C
        code = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32) * rstd
        if HAS_BIAS:
            code += tl.load(zb_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_LN:
            mean = tl.sum(code, axis=0) / C
            centred = tl.where(ok, code - mean, 0.0)
            code = centred / tl.sqrt(tl.sum(centred * centred, axis=0) / C + ln_eps)
            code = code * tl.load(lnw_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_LN_BIAS:
                code += tl.load(lnb_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    else:
        code = lat * rstd * tl.load(nw_ptr + offs_l, mask=offs_l < L, other=0.0).to(tl.float32)
    return code


@jit
def _mla_write_kv_kernel(
    latent_ptr, kpe_ptr, z_ptr, qpe_ptr, pos_ptr, cos_ptr, sin_ptr, nw_ptr, zb_ptr, lnw_ptr, lnb_ptr,
    code_ptr, rope_ptr, scale_ptr, slot_ptr, stored_ptr,
    stride_lat, stride_kpe, stride_z, stride_qt, stride_qh, stride_cos, stride_sin,
    stride_code_b, stride_code_t, stride_rope_b, stride_rope_t, stride_scale_b, stride_scale_t, stride_st,
    eps, ln_eps, fp8_max, min_scale,
    L: tl.constexpr, C: tl.constexpr, P: tl.constexpr, NH: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    L_PAD: tl.constexpr, C_PAD: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
    SPLICE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LN: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
    FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    code = _code(latent_ptr + t * stride_lat, z_ptr + t * stride_z, nw_ptr, zb_ptr, lnw_ptr, lnb_ptr, eps, ln_eps,
                 L, C, L_PAD, C_PAD, SPLICE, HAS_BIAS, HAS_LN, HAS_LN_BIAS)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    code_row = code_ptr + block * stride_code_b + offset * stride_code_t
    rope_row = rope_ptr + block * stride_rope_b + offset * stride_rope_t
    stored_row = stored_ptr + t * stride_st
    cols = tl.arange(0, C_PAD)
    dtype = stored_ptr.dtype.element_ty
    if FP8:
        # Padded lanes hold zeros, so they never raise the max.
        scale = tl.maximum(tl.max(tl.abs(code), axis=0) / fp8_max, min_scale)
        values = tl.minimum(tl.maximum(code / scale, -fp8_max), fp8_max).to(code_ptr.dtype.element_ty)
        tl.store(code_row + cols, values, mask=cols < C)
        tl.store(scale_ptr + block * stride_scale_b + offset * stride_scale_t, scale)
        code = values.to(tl.float32) * scale
    else:
        tl.store(code_row + cols, code.to(dtype), mask=cols < C)
    tl.store(stored_row + cols, code.to(dtype), mask=cols < C)

    pos = tl.load(pos_ptr + t).to(tl.int64)
    half = tl.arange(0, HALF_PAD)
    half_ok = half < P // 2
    c = tl.load(cos_ptr + pos * stride_cos + half, mask=half_ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_sin + half, mask=half_ok, other=0.0).to(tl.float32)
    even, odd = _rotate_pairs(kpe_ptr + t * stride_kpe, half, half_ok, c, s)
    tl.store(rope_row + 2 * half, even.to(dtype), mask=half_ok)
    tl.store(rope_row + 2 * half + 1, odd.to(dtype), mask=half_ok)
    tl.store(stored_row + C + 2 * half, even.to(dtype), mask=half_ok)
    tl.store(stored_row + C + 2 * half + 1, odd.to(dtype), mask=half_ok)

    # Queries: [BLOCK_H, P/2] pairs per step, rotated in place with the same angles.
    q_row = qpe_ptr + t * stride_qt
    for h0 in range(0, NH, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        ok = (heads < NH)[:, None] & half_ok[None, :]
        ptrs = q_row + heads[:, None] * stride_qh + 2 * half[None, :]
        a = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(ptrs + 1, mask=ok, other=0.0).to(tl.float32)
        qdtype = qpe_ptr.dtype.element_ty
        tl.store(ptrs, (a * c[None, :] - b * s[None, :]).to(qdtype), mask=ok)
        tl.store(ptrs + 1, (a * s[None, :] + b * c[None, :]).to(qdtype), mask=ok)


# ----------------------------------------------------------------------------- public API

def mla_write_kv(
    latent: Tensor, k_pe: Tensor, q_pe: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
    kv_cache: Tensor | CacheViews, slot_mapping: Tensor, *, norm_weight: Tensor | None = None, eps: float = 1e-6,
    z_raw: Tensor | None = None, z_bias: Tensor | None = None, code_norm_weight: Tensor | None = None,
    code_norm_bias: Tensor | None = None, code_norm_eps: float = 1e-5, stored: Tensor | None = None,
    impl: str | None = None,
) -> Tensor:
    """Write [code | rope(k_pe)] of T tokens into the cache at slot_mapping, rotate q_pe [T, NH, P]
    in place; returns `stored` [T, C + P] (model dtype) holding the rows as the cache gives them back.

    kv_cache: a layer's CacheViews (fp8 or not), or a model-dtype tensor [N, block_size, C + P].
    latent [T, L], k_pe [T, P], z_raw [T, r] (splice; None at ratio 1.0, then norm_weight [L] is
    required), positions / slot_mapping [T] int64 (int32 works too), cos / sin [max_pos, P/2].
    """
    if not use_triton(latent, impl):
        return mla_write_kv_torch(
            latent, k_pe, q_pe, positions, cos, sin, kv_cache, slot_mapping, norm_weight=norm_weight, eps=eps,
            z_raw=z_raw, z_bias=z_bias, code_norm_weight=code_norm_weight, code_norm_bias=code_norm_bias,
            code_norm_eps=code_norm_eps, stored=stored,
        )
    cache = _views(kv_cache, latent, z_raw)
    dims = _check(latent, k_pe, q_pe, positions, cos, sin, cache, slot_mapping, norm_weight, z_raw, stored)
    if stored is None:
        stored = torch.empty(dims.tokens, dims.code + dims.rope, dtype=cache.rope.dtype, device=latent.device)
    if dims.tokens == 0:
        return stored
    splice = z_raw is not None
    dummy = latent  # never read: its constexpr flag is off
    scale = cache.scale if cache.quantized else cache.rope
    _mla_write_kv_kernel[(dims.tokens,)](
        latent, k_pe, z_raw if splice else dummy, q_pe, positions, cos, sin,
        dummy if norm_weight is None else norm_weight, dummy if z_bias is None else z_bias,
        dummy if code_norm_weight is None else code_norm_weight, dummy if code_norm_bias is None else code_norm_bias,
        cache.code, cache.rope, scale, slot_mapping, stored,
        latent.stride(0), k_pe.stride(0), z_raw.stride(0) if splice else 0, q_pe.stride(0), q_pe.stride(1),
        cos.stride(0), sin.stride(0), cache.code.stride(0), cache.code.stride(1), cache.rope.stride(0),
        cache.rope.stride(1), scale.stride(0), scale.stride(1), stored.stride(0),
        float(eps), float(code_norm_eps), fp8_max(cache.code.dtype) if cache.quantized else 1.0, MIN_SCALE,
        L=dims.latent, C=dims.code, P=dims.rope, NH=dims.heads, BLOCK_SIZE=cache.block_size,
        L_PAD=pad_dim(dims.latent, 16), C_PAD=pad_dim(dims.code, 16), HALF_PAD=pad_dim(dims.rope // 2, 2),
        BLOCK_H=min(MAX_HEAD_BLOCK, pad_dim(dims.heads, 1)),
        SPLICE=splice, HAS_BIAS=splice and z_bias is not None, HAS_LN=splice and code_norm_weight is not None,
        HAS_LN_BIAS=splice and code_norm_weight is not None and code_norm_bias is not None,
        FP8=cache.quantized, num_warps=4,
    )
    return stored


def _check(latent: Tensor, k_pe: Tensor, q_pe: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
           cache: CacheViews, slot_mapping: Tensor, norm_weight: Tensor | None, z_raw: Tensor | None,
           stored: Tensor | None) -> _Dims:
    tokens, latent_dim = latent.shape
    rope = k_pe.shape[-1]
    code = latent_dim if z_raw is None else z_raw.shape[-1]
    if rope % 2 or k_pe.shape != (tokens, rope) or q_pe.dim() != 3 or q_pe.shape[0] != tokens or q_pe.shape[2] != rope:
        raise ValueError(f"k_pe {tuple(k_pe.shape)} / q_pe {tuple(q_pe.shape)} do not match "
                         f"latent {tuple(latent.shape)}")
    if z_raw is None and (norm_weight is None or norm_weight.shape != (latent_dim,)):
        raise ValueError("without z_raw, norm_weight [L] is required")
    if z_raw is not None and z_raw.shape[0] != tokens:
        raise ValueError(f"z_raw {tuple(z_raw.shape)} does not match latent {tuple(latent.shape)}")
    if cache.code.dim() != 3 or cache.code_dim != code or cache.rope.shape[2] != rope:
        raise ValueError(f"kv_cache (code {tuple(cache.code.shape)}, rope {tuple(cache.rope.shape)}) must be "
                         f"[N, block_size, {code}] and [N, block_size, {rope}]")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != rope // 2:
        raise ValueError(f"cos/sin {tuple(cos.shape)} must be [max_pos, {rope // 2}]")
    if positions.shape != (tokens,) or slot_mapping.shape != (tokens,):
        raise ValueError("positions and slot_mapping must be [T]")
    if stored is not None and (stored.shape != (tokens, code + rope) or stored.dtype != cache.rope.dtype):
        raise ValueError(f"stored must be [{tokens}, {code + rope}] in the model dtype")
    check_last_dim_contiguous(latent=latent, k_pe=k_pe, z_raw=z_raw, q_pe=q_pe, cos=cos, sin=sin,
                              kv_cache=cache.code, kv_cache_rope=cache.rope, stored=stored, positions=positions,
                              slot_mapping=slot_mapping)
    return _Dims(tokens, latent_dim, code, rope, q_pe.shape[1])


__all__ = ["mla_code_torch", "mla_write_kv", "mla_write_kv_torch", "rotate_interleaved"]
