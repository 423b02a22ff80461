"""Routed MoE experts: the torch reference against transformers' eager experts, the Triton kernels
(Triton's CPU interpreter, in a subprocess) against the reference, and the module swap.

The interpreter needs TRITON_INTERPRET=1 before triton is imported, and importing fused_moe
imports triton when it is installed, so the kernel checks run in a child process
(`python tests/test_fused_moe.py`), as tests/test_paged_attention.py does.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so the child process (run as a script) finds `server`
    sys.path.insert(0, str(REPO_ROOT))

from tests.interpreter import TRITON_MISSING, run_under_interpreter  # noqa: E402

from server.engine import fused_moe  # noqa: E402
from server.engine.fused_moe import (  # noqa: E402
    FusedMoEExperts,
    install_fused_moe,
    moe_experts_torch,
    uninstall_fused_moe,
)



@dataclass
class MoECase:
    x: torch.Tensor  # [T, H]
    idx: torch.Tensor  # [T, K] int64
    w: torch.Tensor  # [T, K] fp32
    gate_up: torch.Tensor  # [E, 2I, H]
    down: torch.Tensor  # [E, H, I]


def make_case(tokens: int, experts: int = 8, top_k: int = 2, hidden: int = 64, inter: int = 48,
              dtype: torch.dtype = torch.float32, seed: int = 0, shared: tuple[int, ...] = (3,)) -> MoECase:
    """Random case; every token routes to the experts in `shared` (so experts repeat across
    tokens) and to distinct random others, as a top-k router would (no repeat within a token)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.empty(tokens, top_k, dtype=torch.long)
    for t in range(tokens):
        others = [e for e in torch.randperm(experts, generator=gen).tolist() if e not in shared]
        idx[t] = torch.tensor((list(shared) + others)[:top_k])
    w = torch.rand(tokens, top_k, generator=gen) + 0.1
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    return MoECase(x, idx, w, gate_up, down)


def experts_module(case: MoECase, implementation: str = "eager") -> nn.Module:
    """transformers' DeepseekV2Experts holding the case's weights."""
    # Imported here: the interpreter child skips transformers (seconds of start-up).
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts

    experts, two_inter, hidden = case.gate_up.shape
    config = DeepseekV2Config(
        hidden_size=hidden, moe_intermediate_size=two_inter // 2, n_routed_experts=experts,
        num_experts_per_tok=case.idx.shape[1], hidden_act="silu", experts_implementation=implementation,
    )
    module = DeepseekV2Experts(config)
    module.gate_up_proj = nn.Parameter(case.gate_up, requires_grad=False)
    module.down_proj = nn.Parameter(case.down, requires_grad=False)
    return module


class StandInExperts(nn.Module):
    """The experts layout FusedMoEExperts accepts, computed by the torch reference."""

    def __init__(self, case: MoECase) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(case.gate_up, requires_grad=False)
        self.down_proj = nn.Parameter(case.down, requires_grad=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return moe_experts_torch(x, idx, w, self.gate_up_proj, self.down_proj)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- torch reference (this process)

def test_reference_matches_transformers_eager_experts():
    for tokens, seed in ((1, 0), (3, 1), (9, 2)):
        case = make_case(tokens, seed=seed)
        want = experts_module(case)(case.x, case.idx, case.w)
        got = moe_experts_torch(case.x, case.idx, case.w, case.gate_up, case.down)
        assert got.shape == case.x.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_reference_keeps_dtype_and_bf16_is_close_to_fp32():
    case = make_case(4, seed=5)
    want = moe_experts_torch(case.x, case.idx, case.w, case.gate_up, case.down)
    got = moe_experts_torch(case.x.bfloat16(), case.idx, case.w, case.gate_up.bfloat16(), case.down.bfloat16())
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) < 2e-2


def test_wrapper_on_cpu_calls_the_wrapped_module_and_shares_parameters(monkeypatch):
    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton path must not run on CPU without the interpreter")

    monkeypatch.setattr(fused_moe, "moe_experts_triton", no_triton)
    case = make_case(3, seed=3)
    experts = experts_module(case)
    wrapper = FusedMoEExperts(experts, allow_cpu=True)  # allow_cpu needs TRITON_INTERPRET=1 too
    assert wrapper.supported and not wrapper.use_triton(case.x)
    assert wrapper.gate_up_proj is experts.gate_up_proj and wrapper.down_proj is experts.down_proj
    assert set(wrapper.state_dict()) == set(experts.state_dict())
    torch.testing.assert_close(wrapper(case.x, case.idx, case.w), experts(case.x, case.idx, case.w), rtol=0, atol=0)


def test_install_and_uninstall_keep_logits_identical():
    from transformers import AutoModelForCausalLM

    from kvsplice.checkpoints import small_config

    config = small_config("lite")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    keys = set(model.state_dict())
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    originals = [layer.mlp.experts for layer in model.model.layers[config.first_k_dense_replace:]]
    with torch.no_grad():
        before = model(ids).logits

        assert install_fused_moe(model) == moe_layers
        assert install_fused_moe(model) == 0  # idempotent
        wrapped = [layer.mlp.experts for layer in model.model.layers[config.first_k_dense_replace:]]
        assert all(isinstance(m, FusedMoEExperts) for m in wrapped)
        assert set(model.state_dict()) == keys  # same parameter names, nothing copied
        during = model(ids).logits

        assert uninstall_fused_moe(model) == moe_layers
        restored = [layer.mlp.experts for layer in model.model.layers[config.first_k_dense_replace:]]
        after = model(ids).logits
    assert all(a is b for a, b in zip(restored, originals))
    assert torch.equal(during, before) and torch.equal(after, before)


# ---------------------------------------------------------------- Triton kernels (child process)

def test_triton_kernels_under_interpreter_match_reference():
    run_under_interpreter(__file__)


# (kind, make_case kwargs): each row exercises one path of the kernels.
INTERPRETER_CASES = [
    ("T=1", dict(tokens=1)),
    ("T=3, expert 3 in every token", dict(tokens=3)),
    ("T=3 bf16", dict(tokens=3, dtype=torch.bfloat16)),
    ("20 tokens on 2 experts (> BLOCK_M)", dict(tokens=20, shared=(1, 5))),
    ("K=6 of E=16, H/I not powers of 2", dict(tokens=3, experts=16, top_k=6, hidden=40, inter=24, shared=(0, 7))),
    ("T*K > E (all slots used)", dict(tokens=5, experts=4, top_k=3, shared=())),
]


def run_interpreter_checks() -> int:
    """Child-process entry point: kernels vs torch reference on every INTERPRETER_CASES row."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    if fused_moe.triton is None:
        print("triton is not installed")
        return TRITON_MISSING
    # torch.empty then fills floats with NaN and ints with their max value: a scratch element the
    # kernels read without writing it first shows up as NaN or as an out-of-bounds index.
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True

    failures = 0

    def report(ok: bool, line: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {line}")

    for seed, (kind, kwargs) in enumerate(INTERPRETER_CASES):
        case = make_case(seed=seed, **kwargs)
        want = moe_experts_torch(case.x, case.idx, case.w, case.gate_up, case.down)
        got = fused_moe.moe_experts_triton(case.x, case.idx, case.w, case.gate_up, case.down)
        err, tol = rel_err(got, want), (1e-2 if case.x.dtype == torch.bfloat16 else 1e-5)
        report(got.dtype == case.x.dtype and not got.isnan().any() and err < tol,
               f"{kind:40s} rel_err={err:.2e} (tol {tol:g})")

    # Into the caller's buffer (a CUDA graph's static output), x in fp32 with bf16 weights.
    case = make_case(2, seed=10, dtype=torch.bfloat16)
    x = case.x.float()
    out = torch.full_like(x, float("nan"))
    got = fused_moe.moe_experts_triton(x, case.idx, case.w, case.gate_up, case.down, out=out)
    err = rel_err(out, moe_experts_torch(x, case.idx, case.w, case.gate_up, case.down))
    report(got is out and err < 1e-2, f"{'out=, fp32 x with bf16 weights':40s} rel_err={err:.2e}")

    # An expert id outside [0, E) (an expert-parallel sentinel) contributes nothing.
    case = make_case(3, seed=11)
    idx, w = case.idx.clone(), case.w.clone()
    idx[1, 1] = case.gate_up.shape[0]
    got = fused_moe.moe_experts_triton(case.x, idx, case.w, case.gate_up, case.down)
    w[1, 1], idx[1, 1] = 0.0, 0
    err = rel_err(got, moe_experts_torch(case.x, idx, w, case.gate_up, case.down))
    report(err < 1e-5, f"{'out-of-range expert id is skipped':40s} rel_err={err:.2e}")

    # The wrapper takes the Triton path up to max_tokens and the wrapped module above it.
    calls = []
    kernel = fused_moe.moe_experts_triton
    fused_moe.moe_experts_triton = lambda *a, **k: calls.append(1) or kernel(*a, **k)
    try:
        for tokens, want_calls in ((2, 1), (3, 0)):
            calls.clear()
            case = make_case(tokens, seed=20 + tokens)
            experts = StandInExperts(case)
            got = FusedMoEExperts(experts, max_tokens=2, allow_cpu=True)(case.x, case.idx, case.w)
            err = rel_err(got, experts(case.x, case.idx, case.w))
            report(len(calls) == want_calls and err < 1e-5,
                   f"wrapper, T={tokens}, max_tokens=2: {'triton' if calls else 'fallback':8s} rel_err={err:.2e}")
    finally:
        fused_moe.moe_experts_triton = kernel
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_interpreter_checks())
