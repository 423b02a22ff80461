"""The sampler on synthetic logits: each setting changes the distribution the way it should
(measured over seeded draws, so the test is exact to repeat), and min_tokens holds stops back."""
from __future__ import annotations

import torch

from server.engine.sampler import sample
from server.engine.sampling_params import SamplingParams
from server.engine.step import SeqWork

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
DRAWS = 4000


def work(params: SamplingParams, num_output_tokens: int = 0) -> SeqWork:
    return SeqWork("r", [1], 0, [], True, True, params, num_output_tokens)


def frequencies(params: SamplingParams) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    w = work(params)
    counts = torch.zeros(LOGITS.numel())
    for _ in range(DRAWS):
        (token,), _, failed = sample(LOGITS[None].clone(), [w], [gen], set())
        assert not failed
        counts[token] += 1
    return counts / DRAWS


def expected(temperature: float, keep: list[int]) -> torch.Tensor:
    p = torch.zeros(LOGITS.numel())
    p[keep] = torch.softmax(LOGITS[keep] / temperature, dim=0)
    return p


def test_temperature_reshapes_the_distribution():
    for t in (0.5, 1.0, 2.0):
        got = frequencies(SamplingParams(temperature=t))
        assert (got - expected(t, list(range(6)))).abs().max() < 0.03, t


def test_top_k_keeps_the_k_best():
    got = frequencies(SamplingParams(temperature=1.0, top_k=3))
    assert got[3:].sum() == 0
    assert (got - expected(1.0, [0, 1, 2])).abs().max() < 0.03


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS, 0)  # 0.39, 0.24, 0.14, ...: the first two reach 0.6
    assert probs[:1].sum() < 0.6 <= probs[:2].sum()
    got = frequencies(SamplingParams(temperature=1.0, top_p=0.6))
    assert (got - expected(1.0, [0, 1])).abs().max() < 0.03


def test_greedy_and_min_tokens():
    (token,), _, _ = sample(LOGITS[None].clone(), [work(SamplingParams(temperature=0.0))], [None], set())
    assert token == 0
    held = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1])
    (token,), _, _ = sample(LOGITS[None].clone(), [work(held, num_output_tokens=1)], [None], {0})
    assert token == 2  # EOS (0) and the stop token (1) are held back until two tokens are out
    (token,), _, _ = sample(LOGITS[None].clone(), [work(held, num_output_tokens=2)], [None], {0})
    assert token == 0


def test_logprobs_are_of_the_chosen_token():
    params = SamplingParams(temperature=0.0, logprobs=2)
    _, (record,), _ = sample(LOGITS[None].clone(), [work(params)], [None], set())
    logp = torch.log_softmax(LOGITS, 0)
    assert record.token_id == 0 and abs(record.logprob - float(logp[0])) < 1e-6
    assert [t for t, _ in record.top] == [0, 1]


def test_a_failing_row_fails_alone():
    params = SamplingParams(temperature=1.0)
    logits = torch.stack([LOGITS, torch.full_like(LOGITS, float("nan"))])
    tokens, _, failed = sample(logits, [work(params), work(params)], [torch.Generator().manual_seed(0)] * 2, set())
    assert list(failed) == [1] and "sampling failed" in failed[1]
    assert 0 <= tokens[0] < LOGITS.numel()


def test_logit_bias_moves_the_choice():
    forced = SamplingParams(temperature=0.0, logit_bias={4: 100.0})
    (token,), _, _ = sample(LOGITS[None].clone(), [work(forced)], [None], set())
    assert token == 4
    banned = SamplingParams(temperature=0.0, logit_bias={0: -100.0}, logprobs=1)
    (token,), (record,), _ = sample(LOGITS[None].clone(), [work(banned)], [None], set())
    assert token == 1
    # Log-probabilities stay the model's own, as in vLLM (raw log-probs).
    assert abs(record.logprob - float(torch.log_softmax(LOGITS, 0)[1])) < 1e-6
