"""Time the cache kernels with an fp8 cache against the bf16 cache, side by side, on one GPU.

For each ratio (code width 512, 256, 128 of V2-Lite's latent), batch and context: the paged MLA
decode kernel replayed from a CUDA graph on a bf16 cache and on the fp8 cache (fp8 code + per-token
scale + bf16 RoPE), the bytes each must read and the bandwidth reached; then a sweep of the fp8
kernel's launch configuration (BLOCK_T, num_warps, num_stages) at the same shapes, and the
cache-write kernel at a decode step's and a prefill chunk's token counts. Prints tables, writes
$OUT/fp8_kernels.json.

    python scripts/gpu_fp8_kernels.py [--shapes 1x4096,64x4096,128x4096] [--sweep]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvsplice.cache_layout import CacheLayout, CacheViews  # noqa: E402
from kvsplice.kv_quant import quantize  # noqa: E402
from scripts.gpu_check_common import capture_graph  # noqa: E402
from server.kernels.mla_cache import mla_write_kv  # noqa: E402
from server.kernels.mla_decode_triton import paged_mla_decode_triton  # noqa: E402

DEVICE = torch.device("cuda")
HEADS, ROPE, LATENT, BLOCK = 16, 64, 512, 16
SCALE = 0.1
SWEEP = [(32, 4, 5), (64, 8, 2), (64, 4, 3), (32, 4, 3)]  # (BLOCK_T, num_warps, num_stages)


def graph_us(fn, reps: int = 50) -> float:
    graph = capture_graph(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def layout(ratio: float, kv_cache_dtype: str) -> CacheLayout:
    shape = SimpleNamespace(kv_lora_rank=LATENT, num_hidden_layers=1, qk_rope_head_dim=ROPE)
    return CacheLayout.for_ratio(shape, ratio, torch.bfloat16, BLOCK, kv_cache_dtype)


def caches(ratio: float, num_blocks: int, gen: torch.Generator) -> dict[str, CacheViews]:
    """The same random tokens as a bf16 cache and as an fp8 cache."""
    bf16 = layout(ratio, "auto")
    dense = torch.randn(num_blocks, BLOCK, bf16.width, device=DEVICE, generator=gen).to(torch.bfloat16)
    fp8_layout = layout(ratio, "fp8")
    fp8 = fp8_layout.views(torch.zeros(num_blocks, BLOCK, fp8_layout.row_size, dtype=torch.uint8, device=DEVICE))
    values, scale = quantize(dense[..., :bf16.code_dim], fp8.code.dtype)
    fp8.code.copy_(values)
    fp8.scale.copy_(scale)
    fp8.rope.copy_(dense[..., bf16.code_dim:])
    return {"auto": bf16.views(dense), "fp8": fp8}


def decode_rows(ratio: float, batch: int, context: int, sweep: bool) -> list[dict]:
    gen = torch.Generator(device=DEVICE).manual_seed(batch + context)
    blocks = -(-context // BLOCK)
    table = torch.randperm(batch * blocks + 1, device=DEVICE, generator=gen)[: batch * blocks]
    table = table.view(batch, blocks).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    code = layout(ratio, "auto").code_dim
    q_lat = torch.randn(batch, HEADS, code, device=DEVICE, generator=gen).to(torch.bfloat16)
    q_pe = torch.randn(batch, HEADS, ROPE, device=DEVICE, generator=gen).to(torch.bfloat16)
    out = torch.empty_like(q_lat)
    rows = []
    for kv, cache in caches(ratio, batch * blocks + 1, gen).items():
        row_bytes = layout(ratio, kv).bytes_per_token_per_layer
        configs = [{}] + ([dict(block_t=b, num_warps=w, num_stages=s) for b, w, s in SWEEP]
                          if sweep and kv == "fp8" else [])
        for cfg in configs:
            def call(cfg=cfg, cache=cache):
                paged_mla_decode_triton(q_lat, q_pe, cache, table, lens, SCALE, max_context_len=context, out=out,
                                        **cfg)
            try:
                us = graph_us(call)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is a row, not the end
                rows.append(dict(ratio=ratio, kv_cache_dtype=kv, batch=batch, context=context, config=cfg,
                                 error=f"{type(exc).__name__}: {str(exc)[:120]}"))
                continue
            rows.append(dict(ratio=ratio, kv_cache_dtype=kv, batch=batch, context=context, config=cfg, us=us,
                             gbps=batch * context * row_bytes / us / 1e3))
    return rows


def write_rows(ratio: float, tokens: int) -> list[dict]:
    gen = torch.Generator(device=DEVICE).manual_seed(tokens)
    code = layout(ratio, "auto").code_dim
    spliced = code != LATENT
    fused = torch.randn(tokens, LATENT + ROPE + (code if spliced else 0), device=DEVICE, generator=gen)
    fused = fused.to(torch.bfloat16)
    latent, k_pe = fused[:, :LATENT], fused[:, LATENT:LATENT + ROPE]
    z_raw = fused[:, LATENT + ROPE:] if spliced else None
    q_pe = torch.randn(tokens, HEADS, ROPE, device=DEVICE, generator=gen).to(torch.bfloat16)
    cos = sin = torch.rand(8192, ROPE // 2, device=DEVICE, generator=gen)
    positions = torch.randint(0, 8192, (tokens,), device=DEVICE, generator=gen)
    num_blocks = tokens // BLOCK + 2
    slots = torch.randperm(num_blocks * BLOCK, device=DEVICE, generator=gen)[:tokens]
    norm = None if spliced else torch.ones(LATENT, device=DEVICE, dtype=torch.bfloat16)
    rows = []
    for kv in ("auto", "fp8"):
        lay = layout(ratio, kv)
        cache = lay.views(torch.zeros(num_blocks, BLOCK, lay.row_size, dtype=lay.storage_dtype, device=DEVICE))
        stored = torch.empty(tokens, lay.width, dtype=torch.bfloat16, device=DEVICE)

        def call(cache=cache, stored=stored):
            mla_write_kv(latent, k_pe, q_pe, positions, cos, sin, cache, slots, norm_weight=norm, z_raw=z_raw,
                         stored=stored)
        rows.append(dict(ratio=ratio, kv_cache_dtype=kv, tokens=tokens, us=graph_us(call)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1x4096,64x4096,128x4096", help="BATCHxCONTEXT list")
    ap.add_argument("--ratios", default="1.0,0.5,0.25")
    ap.add_argument("--sweep", action="store_true", help="also sweep the fp8 kernel's launch configs")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    decode, write = [], []
    for ratio in ratios:
        for batch, context in shapes:
            decode += decode_rows(ratio, batch, context, args.sweep and batch in (1, 128))
        write += write_rows(ratio, 128) + write_rows(ratio, 8192)
    print("| ratio | batch | context | cache | config | decode us | GB/s |\n|---:|---:|---:|---|---|---:|---:|")
    for r in decode:
        cfg = ",".join(f"{k}={v}" for k, v in r["config"].items()) or "default"
        cells = (f"{r['us']:.1f} | {r['gbps']:.0f}" if "us" in r else f"{r['error']} | -")
        print(f"| {r['ratio']} | {r['batch']} | {r['context']} | {r['kv_cache_dtype']} | {cfg} | {cells} |")
    print("\n| ratio | tokens | cache | write us |\n|---:|---:|---|---:|")
    for r in write:
        print(f"| {r['ratio']} | {r['tokens']} | {r['kv_cache_dtype']} | {r['us']:.1f} |")
    out = Path(os.environ.get("OUT", ".")) / "fp8_kernels.json"
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "decode": decode, "write": write}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
