"""Engine settings: what to load, how much KV memory to use, how to batch."""
from __future__ import annotations

from dataclasses import dataclass

MAX_DEFAULT_MODEL_LEN = 8192


@dataclass
class EngineConfig:
    model: str = "builtin"  # hub id, local path, "builtin" (the model shipped with the package), or a shipped
    # config name (deepseek-v2-lite, deepseek-v2) with load_format="dummy"
    load_format: str = "auto"  # auto: the checkpoint's weights; dummy: random weights of its shape (speed tests)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu
    compression_ratio: float | None = None  # fraction of the latent dims stored; None: the splice file's, else 1.0
    splice_file: str | None = None  # calibrated splices (safetensors); None: initialise with `splice_init`
    splice_init: str = "truncate"  # used only without splice_file: truncate | orthogonal
    kv_cache_bytes: int | None = None  # KV budget in bytes; wins over the fraction when set
    kv_cache_memory_fraction: float = 0.5  # of free device memory (CUDA) or of available RAM (CPU)
    gpu_memory_utilization: float | None = None  # vLLM's: share of the GPU for weights + activations + KV
    block_size: int = 16
    kv_cache_dtype: str = "auto"  # auto/bf16: the model dtype; fp8, fp8_e4m3, fp8_e5m2: fp8 code + per-token scale
    max_num_seqs: int = 64  # running sequences at most
    max_num_batched_tokens: int = 2048  # tokens (prefill + decode) per step at most
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped at 8192
    pipeline_parallel_size: int = 1  # GPUs the layers are split over (one model replica)
    tensor_parallel_size: int = 1  # ranks (GPUs) the heads, experts and vocabulary are split over
    enable_expert_parallel: bool = False  # split the routed experts whole over the ranks, not their columns
    enable_prefix_caching: bool = True  # reuse the cached blocks of a shared prompt prefix
    async_scheduling: bool = True  # schedule and launch step N+1 before step N's tokens are back
    cuda_graphs: bool = True  # capture the decode step in CUDA graphs (CUDA only)
    fused_moe: bool = True  # the Triton routed-experts kernel on CUDA (False: the plain-torch reference)
    attention_backend: str = "auto"  # auto (Triton on CUDA, torch elsewhere), torch, triton
    trust_remote_code: bool = False
    tokenizer: str | None = None  # hub id or path; None: the model's own
    revision: str | None = None  # the model's hub revision (branch, tag or commit)
    chat_template: str | None = None  # a Jinja template, or a file holding one; None: the tokenizer's
    max_logprobs: int = 20  # the most log-probabilities per token a request may ask for
    seed: int = 0


def resolve_max_model_len(config: EngineConfig, hf_config) -> int:
    """The configured length (refused beyond the model's positions), else the model's, capped.
    Every tensor-parallel rank derives it the same way."""
    from kvsplice.model_source import position_limit  # torch: not for the settings' import

    limit, where = position_limit(hf_config)
    if config.max_model_len is None:
        return min(hf_config.max_position_embeddings, MAX_DEFAULT_MODEL_LEN)
    if config.max_model_len > limit:
        raise ValueError(f"max_model_len: {config.max_model_len} is more than the model's {limit} positions "
                         f"({where}); set it to at most {limit}")
    return config.max_model_len
