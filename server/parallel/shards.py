"""Which part of each weight a tensor-parallel rank holds: pure arithmetic, no devices.

DeepSeek-V2 over N ranks, the way vLLM and SGLang cut it:

- attention: heads. A rank holds its heads' query rows (`q_proj`, or `q_b_proj` after the replicated
  q-LoRA down-projection), their rows of the folded up-projection `w_kv`, and their columns of
  `o_proj`, whose partial outputs are summed (one all-reduce). The latent and RoPE-key projection
  (`kv_a_proj_with_mqa`, and the splice encode folded into it) is replicated: every head reads the
  one latent, so every rank writes the same cache rows (see server/parallel/capacity.py).
- dense MLP: intermediate columns (gate/up rows, down columns), one all-reduce.
- MoE, tensor parallel (the default): every expert, a slice of its intermediate columns. The fused
  experts kernel runs unchanged on narrower experts; one all-reduce.
- MoE, expert parallel (`enable_expert_parallel`): whole experts, E / N routed experts per rank;
  the shared experts (always selected) go to ranks round-robin. Every rank routes every token
  (the router is replicated) and maps the chosen expert ids to its own or to "not here" (-1),
  which the kernel skips; one all-reduce sums the ranks' parts.
- vocabulary: embedding rows and lm_head rows in contiguous slices of ceil(V / N), the last one
  padded. The embedding's partial lookups are summed; the lm_head's logit slices are gathered to
  the first rank, which samples.
"""
from __future__ import annotations

from dataclasses import dataclass

SETTING = "tensor_parallel_size"


def even_slice(total: int, rank: int, size: int, what: str) -> tuple[int, int]:
    """[start, stop) of rank's equal share of `total` items; refused unless size divides total."""
    if total % size:
        raise ValueError(f"{SETTING}={size} does not divide the model's {total} {what}; choose a divisor of {total}")
    share = total // size
    return rank * share, (rank + 1) * share


@dataclass(frozen=True)
class VocabShard:
    """Rows [start, stop) of the vocabulary, stored as `rows` (the last shard padded with zero rows)."""

    start: int
    stop: int
    rows: int

    @classmethod
    def of(cls, vocab: int, rank: int, size: int) -> VocabShard:
        rows = -(-vocab // size)
        start = min(rank * rows, vocab)
        return cls(start, min(start + rows, vocab), rows)


@dataclass(frozen=True)
class ExpertShard:
    """The experts a rank computes under expert parallelism, in its local order: routed experts
    [routed_start, routed_stop), then the shared experts in `shared` (indices 0..S-1)."""

    num_routed: int
    routed_start: int
    routed_stop: int
    shared: tuple[int, ...]

    @classmethod
    def of(cls, num_routed: int, num_shared: int, rank: int, size: int) -> ExpertShard:
        start, stop = even_slice(num_routed, rank, size, "routed experts")
        return cls(num_routed, start, stop, tuple(s for s in range(num_shared) if s % size == rank))

    @property
    def num_local(self) -> int:
        return self.routed_stop - self.routed_start + len(self.shared)

    def local_ids(self, num_shared: int) -> list[int]:
        """For every global expert id (routed 0..E-1, then shared E..E+S-1): its local index, or -1."""
        table = [-1] * (self.num_routed + num_shared)
        for local, expert in enumerate(range(self.routed_start, self.routed_stop)):
            table[expert] = local
        for i, s in enumerate(self.shared):
            table[self.num_routed + s] = self.routed_stop - self.routed_start + i
        return table


def check_shardable(hf_config, size: int, expert_parallel: bool) -> None:
    """Refuse, naming the setting, a group size that does not divide what it must split."""
    if size == 1:
        return
    even_slice(hf_config.num_attention_heads, 0, size, "attention heads")
    moe = bool(getattr(hf_config, "n_routed_experts", None))
    if not moe or getattr(hf_config, "first_k_dense_replace", 0):
        even_slice(hf_config.intermediate_size, 0, size, "dense MLP intermediate columns")
    if moe:
        if expert_parallel:
            even_slice(hf_config.n_routed_experts, 0, size, "routed experts (enable_expert_parallel)")
        else:
            even_slice(hf_config.moe_intermediate_size, 0, size, "expert intermediate columns")
