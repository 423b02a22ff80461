"""mla_write_kv (server/kernels/mla_cache.py): latent norm / splice code, RoPE, paged-cache store.

In pytest's process: the torch reference against independent implementations: transformers'
DeepSeek-V2 `apply_rotary_emb` with its own YaRN rotary embedding (cos/sin carry the attention
scaling), its kv_a_layernorm (DeepseekV2RMSNorm), and for the splice the model-side identity
the kernel relies on: z_raw / rms + b == splice.encode(kv_a_layernorm(latent)) when
W_c diag(norm_weight) is folded into the down-projection. In a child process under Triton's CPU
interpreter: the kernel against the reference, cache rows, stored rows and rotated queries.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so the child process (run as a script) finds `server`
    sys.path.insert(0, str(REPO_ROOT))

from tests.interpreter import run_under_interpreter  # noqa: E402
from tests.kernel_checks import assert_equal, assert_rel, run_checks, tol_for  # noqa: E402

from kvsplice.cache_layout import CacheLayout, CacheViews  # noqa: E402
from kvsplice.kv_quant import dequantize, quantize  # noqa: E402
from server.kernels.mla_cache import mla_code_torch, mla_write_kv, mla_write_kv_torch, rotate_interleaved  # noqa: E402

EPS = 1e-6
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256,
        "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 32, "beta_slow": 1}  # attention scaling 1.06


@dataclass
class WriteCase:
    """Inputs of one call: views into a fused projection output, a NaN-poisoned paged cache."""

    latent: torch.Tensor
    k_pe: torch.Tensor
    z_raw: torch.Tensor | None
    q: torch.Tensor  # [T, NH, 5 + P]: q_pe is q[..., 5:] (a strided view, as the real query is)
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cache: torch.Tensor | CacheViews  # CacheViews of poisoned bytes for an fp8 cache
    slots: torch.Tensor
    kwargs: dict

    @property
    def q_pe(self) -> torch.Tensor:
        return self.q[..., 5:]


def make_case(tokens: int, latent: int = 40, rope: int = 8, heads: int = 3, rank: int | None = None,
              layernorm: bool = False, bias: bool = True, block_size: int = 4, dtype: torch.dtype = torch.float32,
              cache_dtype: torch.dtype | None = None, seed: int = 0, pos_dtype: torch.dtype = torch.int64,
              kv_cache_dtype: str = "auto") -> WriteCase:
    gen = torch.Generator().manual_seed(seed)
    code = rank or latent
    width = latent + rope + (rank or 0)
    fused = torch.randn(tokens, width + 3, generator=gen).to(dtype)
    max_pos = 50
    angles = torch.rand(max_pos, rope // 2, generator=gen) * 6.3
    scale = 1.06  # the YaRN attention scaling, folded into cos and sin
    num_blocks = tokens // block_size + 3  # the last blocks play the scratch block padding slots use
    if kv_cache_dtype == "auto":
        cache = torch.full((num_blocks, block_size, code + rope), float("nan"), dtype=cache_dtype or dtype)
    else:  # all-ones bytes: NaN as fp8 (e4m3fn and e5m2), as float32 and as bf16
        layout = CacheLayout(1, latent, code, rope, cache_dtype or dtype, block_size, kv_cache_dtype)
        cache = layout.views(torch.full((num_blocks, block_size, layout.row_size), 255, dtype=torch.uint8))
    kwargs = dict(eps=EPS)
    if rank is None:
        kwargs["norm_weight"] = (1 + 0.1 * torch.randn(latent, generator=gen)).to(dtype)
    else:
        kwargs["z_bias"] = 0.1 * torch.randn(rank, generator=gen) if bias else None
        if layernorm:
            kwargs["code_norm_weight"] = 1 + 0.1 * torch.randn(rank, generator=gen)
            kwargs["code_norm_bias"] = 0.1 * torch.randn(rank, generator=gen)
    return WriteCase(
        latent=fused[:, :latent], k_pe=fused[:, latent:latent + rope],
        z_raw=fused[:, latent + rope:width] if rank else None,
        q=torch.randn(tokens, heads, 5 + rope, generator=gen).to(dtype),
        positions=torch.randint(0, max_pos, (tokens,), generator=gen).to(pos_dtype),
        cos=(angles.cos() * scale).contiguous(), sin=(angles.sin() * scale).contiguous(), cache=cache,
        slots=torch.randperm(num_blocks * block_size, generator=gen)[:tokens], kwargs=kwargs,
    )


def run(case: WriteCase, fn, **extra) -> torch.Tensor:
    return fn(case.latent, case.k_pe, case.q_pe, case.positions, case.cos, case.sin, case.cache, case.slots,
              z_raw=case.z_raw, **case.kwargs, **extra)


# ---------------------------------------------------------------- references (this process)

def rotary_tables(config, max_pos: int):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding

    rotary = DeepseekV2RotaryEmbedding(config)
    freqs = rotary(torch.zeros(1), torch.arange(max_pos)[None])[0]  # complex [max_pos, P/2], scaled
    return rotary, freqs


def test_rope_reference_matches_transformers_apply_rotary_emb():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb

    from kvsplice.checkpoints import small_config

    config = small_config("lite", rope_parameters=YARN)
    rotary, freqs = rotary_tables(config, 64)
    assert abs(rotary.attention_scaling - 1.0) > 0.01, "the test must exercise a non-trivial scaling"
    rope, heads, tokens = config.qk_rope_head_dim, 3, 7
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 64, (tokens,), generator=gen)
    q_pe, k_pe = torch.randn(tokens, heads, rope, generator=gen), torch.randn(tokens, rope, generator=gen)
    want_q, want_k = apply_rotary_emb(q_pe.transpose(0, 1)[None], k_pe[None, None], freqs[positions][None])
    cos, sin = freqs.real.contiguous(), freqs.imag.contiguous()
    got_k = rotate_interleaved(k_pe, cos[positions], sin[positions])
    got_q = rotate_interleaved(q_pe, cos[positions][:, None], sin[positions][:, None])
    torch.testing.assert_close(got_k, want_k[0, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_q, want_q[0].transpose(0, 1), rtol=1e-6, atol=1e-6)


def test_code_without_splice_is_kv_a_layernorm():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm

    case = make_case(6, latent=48)
    norm = DeepseekV2RMSNorm(48, eps=EPS)
    norm.weight.data = case.kwargs["norm_weight"]
    got = mla_code_torch(case.latent, EPS, norm_weight=case.kwargs["norm_weight"])
    torch.testing.assert_close(got, norm(case.latent), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layernorm", [False, True])
def test_splice_code_from_folded_projection_equals_encode_of_normed_latent(layernorm):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm

    from kvsplice.splice import LearnedKVSplice

    latent_dim, gen = 48, torch.Generator().manual_seed(1)
    splice = LearnedKVSplice(latent_dim, compression_ratio=0.4, use_layernorm=layernorm)
    with torch.no_grad():
        splice.compress.weight.copy_(torch.randn(splice.rank, latent_dim, generator=gen) / latent_dim ** 0.5)
        splice.compress.bias.copy_(0.1 * torch.randn(splice.rank, generator=gen))
        if layernorm:
            splice.code_norm.weight.copy_(1 + 0.1 * torch.randn(splice.rank, generator=gen))
            splice.code_norm.bias.copy_(0.1 * torch.randn(splice.rank, generator=gen))
    kv_a_norm = DeepseekV2RMSNorm(latent_dim, eps=EPS)
    kv_a_norm.weight.data = 1 + 0.1 * torch.randn(latent_dim, generator=gen)
    latent = 3 * torch.randn(5, latent_dim, generator=gen)

    folded = splice.compress.weight * kv_a_norm.weight[None, :]  # W_c diag(norm_weight), in the down-proj
    z_raw = latent @ folded.T
    ln = splice.code_norm
    got = mla_code_torch(latent, EPS, z_raw=z_raw, z_bias=splice.compress.bias,
                         code_norm_weight=ln.weight if ln else None, code_norm_bias=ln.bias if ln else None,
                         code_norm_eps=ln.eps if ln else 1e-5)
    with torch.no_grad():
        want = splice.encode(kv_a_norm(latent))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_write_reference_stores_entries_and_rotates_queries():
    case = make_case(5, rank=20, layernorm=True)
    q_before = case.q.clone()
    stored = run(case, mla_write_kv_torch)
    code = mla_code_torch(case.latent, EPS, z_raw=case.z_raw, z_bias=case.kwargs["z_bias"],
                          code_norm_weight=case.kwargs["code_norm_weight"], code_norm_bias=case.kwargs["code_norm_bias"])
    c, s = case.cos[case.positions], case.sin[case.positions]
    assert_equal(stored, torch.cat([code, rotate_interleaved(case.k_pe, c, s)], dim=-1), "stored")
    flat = case.cache.view(-1, case.cache.shape[-1])
    assert_equal(flat[case.slots], stored, "cache rows at the slots")
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[case.slots] = False
    assert flat[untouched].isnan().all(), "no other cache row is written"
    assert_equal(case.q[..., :5], q_before[..., :5], "the nope part of q is untouched")
    assert_equal(case.q_pe, rotate_interleaved(q_before[..., 5:], c[:, None], s[:, None]), "q_pe rotated in place")


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_write_reference_quantizes_per_token_and_stores_what_it_reads(kv_cache_dtype):
    case = make_case(6, rank=20, kv_cache_dtype=kv_cache_dtype, dtype=torch.bfloat16)
    stored = run(case, mla_write_kv_torch)
    code = mla_code_torch(case.latent, EPS, z_raw=case.z_raw, z_bias=case.kwargs["z_bias"])
    values, scale = quantize(code, case.cache.code.dtype)
    blocks, offsets = case.slots // 4, case.slots % 4
    assert_equal(case.cache.code[blocks, offsets].float(), values.float(), "fp8 code at the slots")
    assert_equal(case.cache.scale[blocks, offsets], scale, "per-token scales at the slots")
    # stored is the code as the cache gives it back, so a fresh prefill sees the same values.
    assert_equal(stored[:, :20], dequantize(values, scale).to(stored.dtype), "stored: dequantized code")
    assert_equal(stored[:, 20:], case.cache.rope[blocks, offsets], "stored: RoPE part")
    assert stored.dtype == torch.bfloat16
    assert (scale - code.abs().amax(-1) / torch.finfo(values.dtype).max).abs().max() < 1e-9
    untouched = torch.ones(case.cache.scale.numel(), dtype=torch.bool)
    untouched[case.slots] = False
    assert case.cache.scale.flatten()[untouched].isnan().all(), "no other row is written"


def test_write_rejects_mismatched_cache_width():
    case = make_case(2, rank=20)
    case.cache = torch.zeros(4, 4, 40 + 8)  # C must be r = 20 here, not L = 40
    with pytest.raises(ValueError, match="kv_cache"):
        run(case, mla_write_kv)


# ---------------------------------------------------------------- Triton kernel (child process)

def test_mla_write_kernel_under_interpreter_matches_reference():
    run_under_interpreter(__file__)


def compare(what: str, **kw) -> None:
    mine, theirs = make_case(**kw), make_case(**kw)
    stored = run(mine, mla_write_kv, impl="triton")
    want = run(theirs, mla_write_kv_torch)
    tol = max(tol_for(mine.latent.dtype), tol_for(stored.dtype))
    assert_rel(stored, want, tol, f"{what}: stored")
    # Every cache element compares (NaN == NaN counts as equal): written rows match, others stay NaN.
    for part, got, ref in zip(("code", "RoPE", "scale"), cache_parts(mine.cache), cache_parts(theirs.cache)):
        assert torch.equal(got.isnan(), ref.isnan()), f"{what}: written cache rows differ ({part})"
        assert_rel(got.nan_to_num(), ref.nan_to_num(), tol, f"{what}: cache {part}")
    assert_rel(mine.q, theirs.q, tol_for(mine.q.dtype), f"{what}: q after the in-place RoPE")


def cache_parts(cache: torch.Tensor | CacheViews) -> list[torch.Tensor]:
    if isinstance(cache, torch.Tensor):
        return [cache]
    return [cache.code.float(), cache.rope.float(), cache.scale]


def check_without_splice() -> None:
    compare("ratio 1.0, T=1", tokens=1)
    compare("ratio 1.0, odd L, 17 heads (two head blocks)", tokens=6, latent=37, heads=17, seed=1)
    compare("ratio 1.0, bf16", tokens=5, dtype=torch.bfloat16, seed=2)


def check_with_splice() -> None:
    compare("splice r=20", tokens=5, rank=20, seed=3)
    compare("splice odd r=19, no bias, int32 positions", tokens=4, rank=19, bias=False, seed=4,
            pos_dtype=torch.int32)
    compare("splice + LayerNorm, bf16, block_size 16", tokens=7, rank=20, layernorm=True, block_size=16,
            dtype=torch.bfloat16, seed=5)
    compare("fp32 projections into a bf16 cache", tokens=3, rank=12, cache_dtype=torch.bfloat16, seed=6)


def check_fp8() -> None:
    compare("fp8 ratio 1.0", tokens=6, latent=37, kv_cache_dtype="fp8", seed=8)
    compare("fp8 splice + LayerNorm, bf16", tokens=7, rank=20, layernorm=True, dtype=torch.bfloat16,
            kv_cache_dtype="fp8", seed=9)
    compare("fp8_e5m2 splice, odd r", tokens=5, rank=19, kv_cache_dtype="fp8_e5m2", seed=10)


def check_stored_buffer_and_zero_tokens() -> None:
    case = make_case(3, rank=20, seed=7)
    out = torch.full((3, 28), float("nan"))
    assert run(case, mla_write_kv, impl="triton", stored=out) is out
    assert torch.isfinite(out).all()
    empty = make_case(0, rank=20)
    assert run(empty, mla_write_kv, impl="triton").shape == (0, 28)


CHECKS = [check_without_splice, check_with_splice, check_fp8, check_stored_buffer_and_zero_tokens]

if __name__ == "__main__":
    sys.exit(run_checks(CHECKS))
