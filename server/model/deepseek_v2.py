"""DeepSeek-V2 for serving: the decoder as plain torch modules over the paged cache of stored codes.

One forward runs a flattened batch of tokens from many sequences ([T, hidden], no padding). Per layer:

    h, residual = input_norm(h, residual)                 # residual add fused into the norm
    q | latent | k_pe (| z) = fused_a(h)                  # one GEMM: q_proj, kv_a_proj (and the splice encode)
    code = norm(latent) or z / rms(latent) + b;  rotate q_pe, k_pe;  cache[slot] = [code | k_pe]
    o = backend(q, cache)                                 # absorbed decode / expanded prefill
    h = o_proj(o);  h, residual = post_norm(h, residual);  h = mlp(h)   # dense MLP or MoE

The splice is folded at load time (server/model/loader.py says how): its encode becomes extra rows
of the down-projection and its read path becomes the up-projection `w_kv`, so a spliced layer runs
the same code as a plain one on a narrower cache row. Shared experts run inside the routed-experts
kernel as experts every token selects with weight 1 (one launch instead of three).

Weights load through `load_weights` by the checkpoint's parameter names (transformers' and the
hub's), so every module says which names it reads. transformers' model stays the reference that
the tests compare against.

Tensor parallelism (server/parallel/shards.py says what each rank holds): every module is built
for its rank's share and asks the weight source for that part only; `TensorParallel` sums the
partial outputs (after o_proj, the MLP, the experts, the embedding) and gathers the logit slices.
With one rank those are identities and every shape is the whole model's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvsplice.cache_layout import CacheLayout, CacheViews
from kvsplice.splice import LearnedKVSplice
from server.attention.backend import AttentionBackend
from server.attention.metadata import AttentionMetadata
from server import kernels as ops
from server.model.loader import Part, WeightSource
from server.model.rope import RotaryEmbedding, softmax_scale
from server.parallel.group import SINGLE, TensorParallel
from server.parallel.shards import ExpertShard, VocabShard, even_slice


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """norm(x), or with a residual (norm(x + residual), x + residual)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)

    def load(self, weights: WeightSource, name: str) -> None:
        self.weight.copy_(weights.get(name, self.weight.shape, init="ones"))


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up as one GEMM: the dense layers. A rank holds a
    slice of the intermediate columns; the partial outputs are summed."""

    def __init__(self, hidden: int, inter: int, tp: TensorParallel, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.tp, self.hidden, self.inter = tp, hidden, inter
        self.cols = even_slice(inter, tp.rank, tp.size, "dense MLP intermediate columns")
        local = self.cols[1] - self.cols[0]
        self.gate_up = _param(2 * local, hidden, dtype=dtype, device=device)
        self.down = _param(hidden, local, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.tp.all_reduce(F.linear(ops.silu_and_mul(F.linear(x, self.gate_up)), self.down))

    def load(self, weights: WeightSource, prefix: str) -> None:
        inter, hidden, local = self.inter, self.hidden, self.down.shape[1]
        self.gate_up[:local].copy_(weights.get(prefix + "gate_proj.weight", (inter, hidden), part={0: self.cols}))
        self.gate_up[local:].copy_(weights.get(prefix + "up_proj.weight", (inter, hidden), part={0: self.cols}))
        self.down.copy_(weights.get(prefix + "down_proj.weight", (hidden, inter), part={1: self.cols}))


class MoE(nn.Module):
    """DeepSeek-V2 MoE: softmax router (greedy or group-limited top-k), routed experts scaled by
    routed_scaling_factor, plus shared experts fused in as always-selected experts E..E+S-1.

    Over several ranks every rank routes every token (the router is replicated). Tensor parallel:
    a rank holds every expert's slice of intermediate columns. Expert parallel: it holds whole
    experts (`ExpertShard`) and computes the chosen ones it has; ids of the others map to -1,
    which the kernel skips. Either way the ranks' partial outputs are summed."""

    def __init__(self, config, tp: TensorParallel, dtype: torch.dtype, device: torch.device,
                 use_kernel: bool = True, expert_parallel: bool = False) -> None:
        super().__init__()
        self.use_kernel = use_kernel  # False: the experts' plain-torch path even on CUDA
        self.tp = tp
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.num_shared = config.n_shared_experts or 0
        self.topk_method = config.topk_method
        self.num_groups, self.topk_groups = config.n_group, config.topk_group
        self.scale = config.routed_scaling_factor
        # transformers' V2 router ignores norm_topk_prob; DeepSeek's own code renormalises when it
        # is set. Both public V2 checkpoints leave it off, where the two agree.
        self.renormalize = bool(getattr(config, "norm_topk_prob", False)) and self.top_k > 1
        self.hidden, self.inter = config.hidden_size, config.moe_intermediate_size
        if expert_parallel and tp.size > 1:
            shard = ExpertShard.of(self.num_experts, self.num_shared, tp.rank, tp.size)
            self.routed, self.shared, self.cols = (shard.routed_start, shard.routed_stop), shard.shared, (0, self.inter)
            self.register_buffer("local_ids", torch.tensor(shard.local_ids(self.num_shared), dtype=torch.int32,
                                                           device=device), persistent=False)
        else:
            self.routed, self.shared = (0, self.num_experts), tuple(range(self.num_shared))
            self.cols = even_slice(self.inter, tp.rank, tp.size, "expert intermediate columns")
            self.local_ids = None
        experts = self.routed[1] - self.routed[0] + len(self.shared)
        inter = self.cols[1] - self.cols[0]
        self.gate = _param(self.num_experts, self.hidden, dtype=torch.float32, device=device)  # fp32, as trained
        self.w13 = _param(experts, 2 * inter, self.hidden, dtype=dtype, device=device)  # [gate; up] per expert
        self.w2 = _param(experts, self.hidden, inter, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        common = dict(num_shared=self.num_shared, renormalize=self.renormalize, scale=self.scale)
        if self.topk_method == "group_limited_greedy":
            logits = F.linear(x.float(), self.gate)
            weights, ids = ops.grouped_topk(logits, self.top_k, self.num_groups, self.topk_groups, **common)
        else:
            weights, ids = ops.route(x, self.gate, self.top_k, **common)
        if self.local_ids is not None:
            ids = self.local_ids[ids]  # expert parallel: this rank's experts, -1 for the others
        # The reference path (use_kernel off) stays graph-safe; it exists for debugging on CUDA.
        out = ops.fused_experts(x, ids, weights, self.w13, self.w2, impl=None if self.use_kernel else "torch")
        return self.tp.all_reduce(out)

    def load(self, weights: WeightSource, prefix: str) -> None:
        E, I, H = self.num_experts, self.inter, self.hidden
        routed, (c0, c1) = self.routed, self.cols
        n = routed[1] - routed[0]
        self.gate.copy_(weights.get(prefix + "gate.weight", self.gate.shape, dtype=torch.float32))
        if weights.has(prefix + "experts.gate_up_proj"):  # transformers' fused in-memory layout
            name = prefix + "experts.gate_up_proj"
            gate = weights.get(name, (E, 2 * I, H), part={0: routed, 1: (c0, c1)})
            up = weights.get(name, (E, 2 * I, H), part={0: routed, 1: (I + c0, I + c1)})
            self.w13[:n].copy_(torch.cat([gate, up], dim=1))
            self.w2[:n].copy_(weights.get(prefix + "experts.down_proj", (E, H, I), part={0: routed, 2: (c0, c1)}))
        else:  # the hub's per-expert names
            for local, e in enumerate(range(*routed)):
                self._load_expert(local, weights, f"{prefix}experts.{e}.")
            weights.elsewhere += [f"{prefix}experts.{e}." for e in range(E) if not routed[0] <= e < routed[1]]
        if self.shared:
            self._load_shared(weights, prefix + "shared_experts.")
        elif self.num_shared:
            weights.elsewhere.append(prefix + "shared_experts.")

    def _load_expert(self, local: int, weights: WeightSource, prefix: str) -> None:
        I, H, cols = self.inter, self.hidden, self.cols
        inter = cols[1] - cols[0]
        self.w13[local, :inter].copy_(weights.get(prefix + "gate_proj.weight", (I, H), part={0: cols}))
        self.w13[local, inter:].copy_(weights.get(prefix + "up_proj.weight", (I, H), part={0: cols}))
        self.w2[local].copy_(weights.get(prefix + "down_proj.weight", (H, I), part={1: cols}))

    def _load_shared(self, weights: WeightSource, prefix: str) -> None:
        """The shared MLP (S * I wide) becomes S experts of I (see `append_shared_experts`); a rank
        takes its shared experts' slices of columns."""
        I, H, wide, (c0, c1) = self.inter, self.hidden, self.num_shared * self.inter, self.cols
        rows = [{0: (s * I + c0, s * I + c1)} for s in self.shared]
        gate = torch.cat([weights.get(prefix + "gate_proj.weight", (wide, H), part=p) for p in rows])
        up = torch.cat([weights.get(prefix + "up_proj.weight", (wide, H), part=p) for p in rows])
        down = torch.cat([weights.get(prefix + "down_proj.weight", (H, wide), part={1: p[0]}) for p in rows], dim=1)
        shared13, shared2 = ops.append_shared_experts(self.w13[:0], self.w2[:0], gate, up, down, len(self.shared))
        n = self.routed[1] - self.routed[0]
        self.w13[n:].copy_(shared13)
        self.w2[n:].copy_(shared2)


class MLAAttention(nn.Module):
    """Multi-head latent attention over the paged cache. A rank holds its heads (`head_start`..
    + `num_heads`): their query rows, their rows of the up-projection, their columns of o_proj;
    the latent projection is every rank's, so every rank writes the same cache rows."""

    def __init__(self, config, layout: CacheLayout, backend: AttentionBackend, tp: TensorParallel,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.backend, self.tp = backend, tp
        self.total_heads, self.hidden = config.num_attention_heads, config.hidden_size
        self.head_start, head_stop = even_slice(self.total_heads, tp.rank, tp.size, "attention heads")
        self.num_heads = head_stop - self.head_start
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.latent_dim, self.code_dim = config.kv_lora_rank, layout.code_dim
        self.q_lora_rank = config.q_lora_rank
        self.eps = config.rms_norm_eps
        self.scale = softmax_scale(config)
        qk = self.num_heads * (self.nope_dim + self.rope_dim)
        self.q_width = qk if self.q_lora_rank is None else self.q_lora_rank
        self.z_width = self.code_dim if layout.spliced else 0
        out = self.q_width + self.latent_dim + self.rope_dim + self.z_width
        bias = bool(getattr(config, "attention_bias", False))
        self.fused_a = _param(out, self.hidden, dtype=dtype, device=device)
        self.fused_a_bias = _param(out, dtype=dtype, device=device) if bias else None
        if self.q_lora_rank is not None:
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, self.eps).to(device=device, dtype=dtype)
            self.q_b = _param(qk, self.q_lora_rank, dtype=dtype, device=device)
        self.kv_norm = _param(self.latent_dim, dtype=dtype, device=device)
        self.z_bias = _param(self.code_dim, dtype=dtype, device=device) if layout.spliced else None
        self.code_norm: nn.LayerNorm | None = None  # a splice trained with use_layernorm
        self.w_kv = _param(self.num_heads * (self.nope_dim + self.v_dim), self.code_dim, dtype=dtype, device=device)
        self.b_v: Tensor | None = None
        self.o_proj = _param(self.hidden, self.num_heads * self.v_dim, dtype=dtype, device=device)
        # The bias is added once, by the first rank, to the sum of the ranks' partial outputs.
        self.o_bias = _param(self.hidden, dtype=dtype, device=device) if bias and tp.is_first else None

    @property
    def w_uk(self) -> Tensor:
        """[H, nope, code]: keys' up-projection (absorbed into the query at decode)."""
        return self.w_kv.view(self.num_heads, self.nope_dim + self.v_dim, self.code_dim)[:, : self.nope_dim]

    @property
    def w_uv(self) -> Tensor:
        """[H, v, code]: values' up-projection (applied to the attended code at decode)."""
        return self.w_kv.view(self.num_heads, self.nope_dim + self.v_dim, self.code_dim)[:, self.nope_dim:]

    def forward(self, x: Tensor, positions: Tensor, rope: RotaryEmbedding, kv_cache: CacheViews,
                meta: AttentionMetadata) -> Tensor:
        a = F.linear(x, self.fused_a, self.fused_a_bias)
        q, latent, k_pe, z = a.split([self.q_width, self.latent_dim, self.rope_dim, self.z_width], dim=-1)
        if self.q_lora_rank is not None:
            q = F.linear(self.q_a_layernorm(q), self.q_b)
        q = q.view(-1, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        stored = ops.mla_write_kv(latent, k_pe, q_pe, positions, rope.cos, rope.sin, kv_cache, meta.slot_mapping,
                                  **self._code_args(z))
        out = self.backend.forward(self, q_nope, q_pe, stored, kv_cache, meta)
        return self.tp.all_reduce(F.linear(out.reshape(x.shape[0], -1), self.o_proj, self.o_bias))

    def _code_args(self, z: Tensor) -> dict:
        """How the cache kernel turns the latent into the stored code (see the module docstring)."""
        if not self.z_width:
            return dict(norm_weight=self.kv_norm, eps=self.eps)
        args = dict(eps=self.eps, z_raw=z, z_bias=self.z_bias)
        if self.code_norm is not None:
            args.update(code_norm_weight=self.code_norm.weight, code_norm_bias=self.code_norm.bias,
                        code_norm_eps=self.code_norm.eps)
        return args

    # -- loading: fold the splice into the projections ------------------------------------------

    def _heads(self, width: int) -> tuple[int, int]:
        """[start, stop) of this rank's heads in a per-head dimension `width` values a head."""
        return self.head_start * width, (self.head_start + self.num_heads) * width

    @torch.no_grad()
    def load(self, weights: WeightSource, prefix: str, splice: LearnedKVSplice | None) -> None:
        qk, kv = self.nope_dim + self.rope_dim, self.nope_dim + self.v_dim
        q_rows: Part = {0: self._heads(qk)}
        if self.q_lora_rank is None:
            q = weights.get(prefix + "q_proj.weight", (self.total_heads * qk, self.hidden), part=q_rows)
        else:
            q = weights.get(prefix + "q_a_proj.weight", (self.q_lora_rank, self.hidden))
            self.q_a_layernorm.load(weights, prefix + "q_a_layernorm.weight")
            self.q_b.copy_(weights.get(prefix + "q_b_proj.weight", (self.total_heads * qk, self.q_lora_rank),
                                       part=q_rows))
        kv_a = weights.get(prefix + "kv_a_proj_with_mqa.weight", (self.latent_dim + self.rope_dim, self.hidden))
        norm = weights.get(prefix + "kv_a_layernorm.weight", (self.latent_dim,), init="ones")
        kv_b = weights.get(prefix + "kv_b_proj.weight", (self.total_heads * kv, self.latent_dim),
                           part={0: self._heads(kv)})
        rows = [q, kv_a]
        biases = self._biases(weights, prefix, q_rows) if self.fused_a_bias is not None else None
        self.kv_norm.copy_(norm)
        if splice is None:
            self.w_kv.copy_(kv_b)
        else:
            w_z, b_z = fold_encode(splice, kv_a[: self.latent_dim], norm, None if biases is None else biases[1])
            rows.append(w_z)
            self.z_bias.copy_(b_z)
            if biases is not None:
                biases = (biases[0], biases[1], torch.zeros(self.z_width, device=biases[0].device))
            self.code_norm = splice.code_norm
            w_kv, bias = splice.fold_into_kv_b_proj(kv_b.float())  # row by row: this rank's heads' rows
            self.w_kv.copy_(w_kv)
            self.b_v = bias.view(self.num_heads, -1)[:, self.nope_dim:].to(self.w_kv.dtype).contiguous()
        self.fused_a.copy_(torch.cat(rows))
        if biases is not None:
            self.fused_a_bias.copy_(torch.cat(biases))
        self.o_proj.copy_(weights.get(prefix + "o_proj.weight", (self.hidden, self.total_heads * self.v_dim),
                                      part={1: self._heads(self.v_dim)}))
        if self.o_bias is not None:
            self.o_bias.copy_(weights.get(prefix + "o_proj.bias", self.o_bias.shape))

    def _biases(self, weights: WeightSource, prefix: str, q_rows: Part) -> tuple[Tensor, ...]:
        if self.q_lora_rank is None:
            q = weights.get(prefix + "q_proj.bias", (self.total_heads * (self.nope_dim + self.rope_dim),), part=q_rows)
        else:
            q = weights.get(prefix + "q_a_proj.bias", (self.q_lora_rank,))
        return q, weights.get(prefix + "kv_a_proj_with_mqa.bias", (self.latent_dim + self.rope_dim,))


@torch.no_grad()
def fold_encode(splice: LearnedKVSplice, w_latent: Tensor, norm: Tensor,
                kv_a_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """The splice encode folded into the latent down-projection.

    z = W_c (s * rmsnorm(c) + t) + b_c with rmsnorm(c) = g * c / rms(c) and c = W_lat x (+ b_lat)
      = (W_c diag(s * g) W_lat x) / rms(c) + (W_c t + b_c) + (W_c diag(s * g) b_lat) / rms(c)
    The model computes W_z x in the same GEMM as the latent, and the cache kernel applies the
    per-token 1 / rms(c). A kv_a bias would make the last term depend on rms(c): refused."""
    if kv_a_bias is not None and kv_a_bias[: norm.shape[0]].abs().max() > 0:
        raise ValueError("a splice cannot be folded into a kv_a_proj_with_mqa that has a bias")
    w_c, b_c = splice.compress.weight.float(), splice.compress.bias.float()
    scale = norm.float().to(w_c.device)
    if splice.use_transform:
        b_c = b_c + w_c @ splice.transform_shift.float()
        scale = scale * splice.transform_scale.float()
    w_z = (w_c * scale[None, :]) @ w_latent.float().to(w_c.device)
    return w_z.to(w_latent.dtype), b_c


class DecoderLayer(nn.Module):
    def __init__(self, config, index: int, layout: CacheLayout, backend: AttentionBackend, tp: TensorParallel,
                 dtype: torch.dtype, device: torch.device, fused_moe: bool = True,
                 expert_parallel: bool = False) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps).to(device=device, dtype=dtype)
        self.self_attn = MLAAttention(config, layout, backend, tp, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps).to(device=device, dtype=dtype)
        dense = config.n_routed_experts is None or index < config.first_k_dense_replace
        self.mlp = (GatedMLP(config.hidden_size, config.intermediate_size, tp, dtype, device) if dense
                    else MoE(config, tp, dtype, device, fused_moe, expert_parallel))

    def forward(self, h: Tensor, residual: Tensor | None, positions: Tensor, rope: RotaryEmbedding,
                kv_cache: CacheViews, meta: AttentionMetadata) -> tuple[Tensor, Tensor]:
        if residual is None:
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, positions, rope, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    def load(self, weights: WeightSource, prefix: str, splice: LearnedKVSplice | None) -> None:
        self.input_layernorm.load(weights, prefix + "input_layernorm.weight")
        self.post_attention_layernorm.load(weights, prefix + "post_attention_layernorm.weight")
        self.self_attn.load(weights, prefix + "self_attn.", splice)
        self.mlp.load(weights, prefix + "mlp.")


class VocabParallelEmbedding(nn.Module):
    """The embedding rows of this rank's vocabulary shard; a token outside it looks up zeros, and
    the ranks' lookups are summed."""

    def __init__(self, vocab: int, hidden: int, tp: TensorParallel, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.tp, self.vocab, self.hidden = tp, vocab, hidden
        self.shard = VocabShard.of(vocab, tp.rank, tp.size)
        self.weight = _param(self.shard.rows, hidden, dtype=dtype, device=device)

    def forward(self, ids: Tensor) -> Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.shard.start
        here = (local >= 0) & (ids < self.shard.stop)
        h = F.embedding(torch.where(here, local, 0), self.weight) * here[:, None].to(self.weight.dtype)
        return self.tp.all_reduce(h)


def load_vocab_rows(param: Tensor, shard: VocabShard, weights: WeightSource, name: str, vocab: int) -> None:
    """A vocab-sharded weight's rows; the padding rows past the vocabulary stay zero."""
    param.zero_()
    if shard.stop > shard.start:
        rows = weights.get(name, (vocab, param.shape[1]), part={0: (shard.start, shard.stop)})
        param[: shard.stop - shard.start].copy_(rows)


class DeepseekV2ForCausalLM(nn.Module):
    """Embedding, decoder layers (each on its own device for a layer split), final norm, lm_head.
    `layer_tp` gives each layer's tensor-parallel group (default: one rank everywhere); the
    embedding uses the first layer's, the lm_head the last one's."""

    def __init__(self, config, layout: CacheLayout, backend: AttentionBackend, max_positions: int,
                 dtype: torch.dtype, layer_devices: list[torch.device], fused_moe: bool = True,
                 layer_tp: list[TensorParallel] | None = None, expert_parallel: bool = False) -> None:
        super().__init__()
        self.config, self.layout, self.dtype = config, layout, dtype
        self.layer_devices = layer_devices
        tp = layer_tp or [SINGLE] * len(layer_devices)
        first, last = layer_devices[0], layer_devices[-1]
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp[0], dtype, first)
        self.layers = nn.ModuleList(DecoderLayer(config, i, layout, backend, tp[i], dtype, d, fused_moe, expert_parallel)
                                    for i, d in enumerate(layer_devices))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps).to(device=last, dtype=dtype)
        self.head_tp = tp[-1]
        self.head_shard = VocabShard.of(config.vocab_size, self.head_tp.rank, self.head_tp.size)
        self.lm_head = _param(self.head_shard.rows, config.hidden_size, dtype=dtype, device=last)
        # One cos/sin table per device (a layer split would otherwise copy it every layer).
        self.rope = {d: RotaryEmbedding(config, max_positions).to(d) for d in dict.fromkeys(layer_devices)}

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[CacheViews],
                meta: AttentionMetadata) -> Tensor:
        """Final-norm hidden states [T, hidden] of the flattened batch; the caches get its rows."""
        h, residual = self.embed_tokens(input_ids), None
        for layer, device, kv_cache in zip(self.layers, self.layer_devices, kv_caches):
            if h.device != device:  # the next GPU of a layer split
                h, residual, positions, meta = h.to(device), residual.to(device), positions.to(device), meta.to(device)
            h, residual = layer(h, residual, positions, self.rope[device], kv_cache, meta)
        h, _ = self.norm(h, residual)
        return h

    @torch.inference_mode()
    def compute_logits(self, hidden: Tensor) -> Tensor | None:
        """float32 logits [R, vocab] of hidden [R, hidden] on the first rank (None on the others,
        which send it their vocabulary slices)."""
        logits = self.head_tp.gather_to_first(F.linear(hidden, self.lm_head))
        return None if logits is None else logits[:, : self.config.vocab_size].float()

    @torch.no_grad()
    def load_weights(self, weights: WeightSource, splices: list[LearnedKVSplice | None]) -> None:
        c = self.config
        weights.device = self.layer_devices[0]
        load_vocab_rows(self.embed_tokens.weight, self.embed_tokens.shard, weights, "model.embed_tokens.weight",
                        c.vocab_size)
        for i, (layer, splice, device) in enumerate(zip(self.layers, splices, self.layer_devices)):
            weights.device = device
            layer.load(weights, f"model.layers.{i}.", splice)
        self.norm.load(weights, "model.norm.weight")
        lm_head = "model.embed_tokens.weight" if getattr(c, "tie_word_embeddings", False) else "lm_head.weight"
        load_vocab_rows(self.lm_head, self.head_shard, weights, lm_head, c.vocab_size)
        weights.finish()
