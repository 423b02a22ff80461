"""Small DeepSeek-V2 checkpoints, the public DeepSeek-V2 configs, and the built-in model.

A small checkpoint has the structure of DeepSeek-V2-Lite (MLA with YaRN RoPE, a dense first
layer, MoE with shared experts) at a size a CPU runs in milliseconds, random but seeded weights
and the project's byte-level tokenizer. It is an ordinary transformers model directory
(``model_type`` ``deepseek_v2``, safetensors, no remote code), so everything that loads a real
DeepSeek-V2 checkpoint loads it the same way.

``python -m kvsplice.checkpoints --variant lite|qlora --out DIR [--seed N] [--dtype bfloat16]``
builds one. The built-in model (``builtin_model_path``) is a trained one, see docs/quality.md.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config, GenerationConfig

from kvsplice.corpus import BOS_TOKEN, EOS_TOKEN, TOKENIZER_DIR

from kvsplice.model_source import BUILTIN_MODEL_DIR, SHIPPED_CONFIGS

# DeepSeek-V2-Lite's layout scaled down: qk = 32 nope + 16 rope per head, a 64-wide latent,
# 8 routed experts (top 2) + 1 shared, first layer dense. YaRN as in the real model, with
# factor == max_position_embeddings / original_max_position_embeddings (1024 / 256) so that
# transformers' consistency check agrees.
_LITE = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    intermediate_size=384, moe_intermediate_size=96, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=1, topk_method="greedy", n_group=None,
    topk_group=None, routed_scaling_factor=1.0, norm_topk_prob=False,
    max_position_embeddings=1024, initializer_range=0.02, tie_word_embeddings=False,
    rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 256, "mscale": 0.707, "mscale_all_dim": 0.707,
        "beta_fast": 32, "beta_slow": 1,
    },
)
# The full DeepSeek-V2 adds a low-rank query path and group-limited (device-limited) routing.
_QLORA = dict(
    q_lora_rank=64, topk_method="group_limited_greedy", n_group=4, topk_group=2,
    routed_scaling_factor=2.0,
)
VARIANTS = {"lite": _LITE, "qlora": {**_LITE, **_QLORA}}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def special_token_ids() -> dict[str, int]:
    """bos/eos/pad ids of the project tokenizer (pad is eos)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    bos, eos = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}


def small_config(variant: str = "lite", vocab_size: int = 8192, **overrides) -> DeepseekV2Config:
    """A DeepSeek-V2-Lite-shaped config at toy scale; ``qlora`` adds V2's q-LoRA and routing."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    values = {**VARIANTS[variant], "vocab_size": vocab_size, **special_token_ids(), **overrides}
    return DeepseekV2Config(**values)


def build_small_checkpoint(
    out_dir: Path, variant: str = "lite", seed: int = 0, dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """Write a seeded random small checkpoint with the tokenizer; same seed, same bytes."""
    config = small_config(variant, **overrides)
    # A forked RNG keeps the caller's random state untouched by the seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, do_sample=False,
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    for name in _TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, out_dir / name)
    return out_dir


def builtin_model_path() -> Path:
    """The model shipped in the package (``kvsplice-tiny``): trained on the corpus by
    scripts/train_small_model.py (docs/quality.md says how), not built here."""
    return BUILTIN_MODEL_DIR


def shipped_config_path(name: str) -> Path:
    """Path of a shipped public config: ``deepseek-v2-lite`` or ``deepseek-v2``."""
    if name not in SHIPPED_CONFIGS:
        raise KeyError(f"no shipped config {name!r}; choose one of {sorted(SHIPPED_CONFIGS)}")
    return SHIPPED_CONFIGS[name]


def shipped_config(name: str) -> DeepseekV2Config:
    """A shipped public config, loaded (e.g. to build the real shape with random weights)."""
    return DeepseekV2Config.from_json_file(shipped_config_path(name))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="lite")
    parser.add_argument("--out", type=Path, help="output model directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is required")
    path = build_small_checkpoint(args.out, args.variant, args.seed, getattr(torch, args.dtype))
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"{path}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
