"""The paged engine against transformers on the small checkpoints, and its scheduling behaviour."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvsplice import get_kv_cache_size, get_splices, patch_model_with_kvsplice, pca_splices, collect_latents, save_splices
from server.engine.config import EngineConfig
from server.engine.llm import LLM
from server.engine.llm_engine import LLMEngine, PromptRejected
from server.engine.sampling_params import SamplingParams
from tests.model_fixtures import load

PROMPTS = [
    "To be, or not to be",
    "Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds",
    "O",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. The evil that men do lives after them.",
]
NEW_TOKENS = 32
TOP = 5


@torch.no_grad()
def transformers_greedy(model, prompt_ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with transformers' own forward and cache: tokens and each step's log-probs."""
    cache = DynamicCache(config=model.config)
    logits = model(torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True).logits[0, -1]
    tokens, steps = [], []
    for _ in range(n):
        steps.append(logits.float().log_softmax(-1))
        tokens.append(int(logits.argmax()))
        logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return tokens, steps


def run_engine(engine: LLMEngine, prompts, params: SamplingParams) -> dict:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    return outs


def greedy(n: int = NEW_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=TOP, **kw)


def assert_matches_transformers(outs: dict, model, tokenizer, atol: float = 2e-4) -> None:
    for i, prompt in enumerate(PROMPTS):
        ref_tokens, ref_steps = transformers_greedy(model, tokenizer.encode(prompt), NEW_TOKENS)
        out = outs[str(i)]
        assert out.token_ids == ref_tokens, f"prompt {i}"
        for record, ref in zip(out.logprobs, ref_steps):
            values, ids = ref.topk(TOP)
            # Near-ties may swap places under TF32 on a GPU; the values must agree either way.
            torch.testing.assert_close(torch.tensor([v for _, v in record.top]), values.cpu(), rtol=0, atol=atol)
            if atol <= 2e-4:
                assert [t for t, _ in record.top] == ids.tolist()


def test_ratio_one_matches_transformers_generate(variant_model):
    _, path, model, tokenizer = variant_model
    engine = LLMEngine(EngineConfig(model=path, kv_cache_bytes=4 << 20, max_num_batched_tokens=64))
    outs = run_engine(engine, PROMPTS, greedy())
    assert all(o.finish_reason == "length" and len(o.token_ids) == NEW_TOKENS for o in outs.values())
    assert_matches_transformers(outs, model, tokenizer)


def test_half_ratio_matches_patched_transformers(variant_model, tmp_path):
    _, path, model, tokenizer = variant_model
    batches = [torch.tensor([tokenizer.encode(p)]) for p in PROMPTS]
    splices = pca_splices(collect_latents(model, batches), 0.5)
    splice_file = save_splices(tmp_path / "s.safetensors", splices, model)
    engine = LLMEngine(EngineConfig(model=path, compression_ratio=0.5, splice_file=str(splice_file),
                                    kv_cache_bytes=4 << 20))
    outs = run_engine(engine, PROMPTS, greedy())
    patch_model_with_kvsplice(model, splices=splices)
    assert get_splices(model)[0].rank == model.config.kv_lora_rank // 2
    assert_matches_transformers(outs, model, tokenizer)


def test_splice_file_alone_sets_the_ratio_and_zero_shot_warns(checkpoint_dirs, tmp_path, caplog):
    path = checkpoint_dirs["lite"]
    model, tokenizer = load(path)
    splices = pca_splices(collect_latents(model, [torch.tensor([tokenizer.encode(p)]) for p in PROMPTS]), 0.5)
    splice_file = save_splices(tmp_path / "s.safetensors", splices, model)
    with caplog.at_level("WARNING"):
        from_file = LLMEngine(EngineConfig(model=path, splice_file=str(splice_file), kv_cache_bytes=2 << 20))
    assert from_file.stats().compression_ratio == 0.5 and "zero-shot" not in caplog.text
    with pytest.raises(ValueError, match="has compression_ratio 0.5, the engine is set to 0.25"):
        LLMEngine(EngineConfig(model=path, splice_file=str(splice_file), compression_ratio=0.25,
                               kv_cache_bytes=2 << 20))
    with caplog.at_level("WARNING"):
        LLMEngine(EngineConfig(model=path, compression_ratio=0.5, kv_cache_bytes=2 << 20))
    assert "zero-shot 'truncate' splice costs quality" in caplog.text and "kvsplice calibrate" in caplog.text


def test_preemption_keeps_greedy_output_and_frees_blocks(checkpoint_dirs):
    path = checkpoint_dirs["lite"]
    prompts = PROMPTS * 2
    params = greedy(24)
    free = run_engine(LLMEngine(EngineConfig(model=path, kv_cache_bytes=8 << 20)), prompts, params)
    # 12 blocks of 16 tokens: every request fits alone, the batch (~36 blocks) does not.
    per_token = get_kv_cache_size(load(path)[0].config, dtype=torch.float32).bytes_per_token
    tight_engine = LLMEngine(EngineConfig(model=path, kv_cache_bytes=12 * 16 * per_token, block_size=16))
    tight = run_engine(tight_engine, prompts, params)
    stats = tight_engine.stats()
    assert stats.num_preemptions_total > 0
    assert {k: v.token_ids for k, v in tight.items()} == {k: v.token_ids for k, v in free.items()}
    assert stats.num_blocks_free == stats.num_blocks_total and stats.kv_bytes_in_use == 0


@pytest.mark.parametrize("budget", [3 << 20, 10_000_000])
def test_capacity_ratio_follows_bytes_per_token(checkpoint_dirs, budget):
    path = checkpoint_dirs["lite"]
    cap = {r: LLMEngine(EngineConfig(model=path, compression_ratio=r, kv_cache_bytes=budget)).stats()
           for r in (1.0, 0.5)}
    model, _ = load(path)
    cfg = model.config
    expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) / (cfg.kv_lora_rank // 2 + cfg.qk_rope_head_dim)
    ratio = cap[0.5].kv_capacity_tokens / cap[1.0].kv_capacity_tokens
    block = 16 / cap[1.0].kv_capacity_tokens  # one block of rounding on either side
    assert abs(ratio - expected) <= expected * 2 * block + 1e-9
    assert cap[0.5].kv_bytes_per_token * cap[1.0].kv_capacity_tokens <= budget


def test_v2_lite_shape_capacity_ratio_is_576_over_320():
    from kvsplice.cache_layout import CacheLayout
    from kvsplice.model_source import load_config
    from server.engine.kv_budget import plan_num_blocks

    cfg = load_config("deepseek-v2-lite")
    budget = 40 << 30
    blocks = {}
    for r in (1.0, 0.5):
        layout = CacheLayout.for_ratio(cfg, r, block_size=64)
        blocks[r] = plan_num_blocks(EngineConfig(kv_cache_bytes=budget, block_size=64), layout,
                                    {torch.device("cpu"): cfg.num_hidden_layers}, 0)
    assert abs(blocks[0.5] / blocks[1.0] - 576 / 320) < 2 / blocks[1.0]


def test_abort_frees_blocks(checkpoint_dirs):
    engine = LLMEngine(EngineConfig(model=checkpoint_dirs["lite"], kv_cache_bytes=4 << 20))
    engine.add_request("a", PROMPTS[1], greedy(200))
    engine.add_request("b", PROMPTS[0], greedy(4))
    for _ in range(3):
        engine.step()
    assert engine.stats().num_blocks_free < engine.stats().num_blocks_total
    out = engine.abort("a")
    assert out.finished and out.finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    stats = engine.stats()
    assert stats.num_blocks_free == stats.num_blocks_total and stats.num_running == 0


def test_stop_string_and_max_tokens(checkpoint_dirs):
    llm = LLM(checkpoint_dirs["lite"], kv_cache_bytes=4 << 20)
    base = llm.generate(PROMPTS[0], greedy(12))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 12
    stop = base.text[3:6]
    assert stop.strip(), "the model's text should give a usable stop string"
    cut = llm.generate(PROMPTS[0], greedy(12, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == base.text[: base.text.find(stop)]
    stop_token = base.token_ids[5]
    by_id = llm.generate(PROMPTS[0], greedy(12, stop_token_ids=[stop_token]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids[-1] == stop_token
    assert by_id.token_ids == base.token_ids[: base.token_ids.index(stop_token) + 1]


def test_seed_reproduces_sample(checkpoint_dirs):
    llm = LLM(checkpoint_dirs["lite"], kv_cache_bytes=4 << 20)
    params = [SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=s, ignore_eos=True)
              for s in (7, 7, 8)]
    a, b, c = llm.generate([PROMPTS[1]] * 3, params)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_request_that_cannot_fit_is_refused(checkpoint_dirs):
    engine = LLMEngine(EngineConfig(model=checkpoint_dirs["lite"], kv_cache_bytes=4 << 20, max_model_len=64))
    with pytest.raises(PromptRejected, match="exceeds the model's context length of 64") as refused:
        engine.add_request("x", PROMPTS[3], greedy(60))
    assert refused.value.param == "max_tokens"
    with pytest.raises(PromptRejected, match="prompt: must not be empty"):
        engine.add_request("y", "", greedy())
    with pytest.raises(PromptRejected, match=r"token ids must be integers in \[0, "):
        engine.add_request("z", [engine.hf_config.vocab_size], greedy())
    assert not engine.has_unfinished()


def test_prompt_logprobs_score_each_next_prompt_token_across_chunks(checkpoint_dirs):
    path = checkpoint_dirs["lite"]
    model, tokenizer = load(path)
    prompt = tokenizer.encode(PROMPTS[3])
    # Chunks of 8 tokens: the scores of one chunk's last position belong to the next chunk's first token.
    engine = LLMEngine(EngineConfig(model=path, kv_cache_bytes=4 << 20, max_num_batched_tokens=8))
    outs = run_engine(engine, [prompt], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2))
    got = outs["0"].prompt_logprobs
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    assert got[0] is None and len(got) == len(prompt)
    for i in range(1, len(prompt)):
        assert got[i].token_id == prompt[i]
        assert abs(got[i].logprob - float(ref[i - 1, prompt[i]])) < 2e-4
        assert [t for t, _ in got[i].top] == ref[i - 1].topk(2).indices.tolist()


def test_min_tokens_holds_back_a_stop_token(checkpoint_dirs):
    llm = LLM(checkpoint_dirs["lite"], kv_cache_bytes=4 << 20)
    base = llm.generate(PROMPTS[0], greedy(8))[0].token_ids
    first = base[0]
    stopped = llm.generate(PROMPTS[0], greedy(8, stop_token_ids=[first]))[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    held = llm.generate(PROMPTS[0], greedy(8, stop_token_ids=[first], min_tokens=3))[0]
    assert len(held.token_ids) >= 3 and first not in held.token_ids[:2]


def _align16(n: int) -> int:
    return -(-n // 16) * 16


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_cache_bytes_per_token_include_the_rope_part(checkpoint_dirs, kv_cache_dtype):
    for ratio in (1.0, 0.5):
        engine = LLMEngine(EngineConfig(model=checkpoint_dirs["lite"], compression_ratio=ratio, kv_cache_bytes=2 << 20,
                                        kv_cache_dtype=kv_cache_dtype))
        cfg, runner = engine.hf_config, engine.core.runner
        code = cfg.kv_lora_rank if ratio == 1.0 else cfg.kv_lora_rank // 2
        if kv_cache_dtype == "auto":
            per_layer = (code + cfg.qk_rope_head_dim) * 4  # float32 on the CPU
        else:  # fp8 code, a float32 scale, the RoPE key in float32: each part 16-byte aligned
            per_layer = _align16(code) + 16 + _align16(cfg.qk_rope_head_dim * 4)
        per_token = cfg.num_hidden_layers * per_layer
        assert engine.stats().kv_bytes_per_token == per_token
        allocated = sum(c.nbytes for c in runner.kv_caches)
        tokens = runner.kv_caches[0].num_blocks * runner.kv_caches[0].block_size  # the scratch block included
        assert allocated == per_token * tokens
        assert engine.stats().compression_ratio == code / cfg.kv_lora_rank
        assert engine.stats().kv_cache_dtype == kv_cache_dtype


def test_block_table_rows_come_back_when_the_engine_goes_idle(checkpoint_dirs):
    """Requests that end while nothing else runs must still give the runner their rows: more
    requests than max_num_seqs, one after another, each alone in the engine."""
    engine = LLMEngine(EngineConfig(model=checkpoint_dirs["lite"], kv_cache_bytes=2 << 20, max_num_seqs=2))
    for i in range(5):
        outs = run_engine(engine, [PROMPTS[0]], greedy(2))
        assert outs["0"].finish_reason == "length"
        engine.step()  # idle, as the server's engine loop steps: the plan carries only releases
    assert len(engine.core.runner._free_rows) == 2


def test_bf16_cache_on_a_float32_model_is_refused_with_the_alternatives(checkpoint_dirs):
    with pytest.raises(ValueError, match="kv_cache_dtype bf16 needs dtype bfloat16.*auto, fp8"):
        LLMEngine(EngineConfig(model=checkpoint_dirs["lite"], kv_cache_bytes=2 << 20, kv_cache_dtype="bf16"))


@torch.no_grad()
def penalized_greedy(model, prompt_ids: list[int], n: int, presence: float, frequency: float,
                     repetition: float) -> list[int]:
    """Greedy decoding with the penalties written out over transformers' logits (no cache)."""
    ids, out = list(prompt_ids), []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[torch.tensor(ids)] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
        counts = torch.zeros_like(logits)
        for t in out:
            counts[t] += 1
        logits = logits - frequency * counts - presence * (counts > 0).float()
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


@pytest.mark.parametrize("presence,frequency,repetition", [(0.0, 0.0, 1.3), (0.8, 0.5, 1.0), (-0.5, 1.5, 0.9)])
def test_penalties_match_the_written_out_rule(checkpoint_dirs, presence, frequency, repetition):
    path = checkpoint_dirs["lite"]
    model, tokenizer = load(path)
    # A small batch budget chunks the long prompt (its tokens reach the penalty state in pieces),
    # and a penalty-free request rides along in the same steps.
    engine = LLMEngine(EngineConfig(model=path, kv_cache_bytes=4 << 20, max_num_batched_tokens=16))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=presence,
                            frequency_penalty=frequency, repetition_penalty=repetition)
    engine.add_request("penalized", PROMPTS[1], params)
    engine.add_request("plain", PROMPTS[0], greedy(12))
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    want = penalized_greedy(model, tokenizer.encode(PROMPTS[1]), 12, presence, frequency, repetition)
    assert outs["penalized"].token_ids == want
    assert outs["plain"].token_ids == transformers_greedy(model, tokenizer.encode(PROMPTS[0]), 12)[0]
    # Again, its prompt's first blocks now found in the prefix cache: the penalties still see them.
    hits = engine.stats().prefix_cache_hits_total
    again = run_engine(engine, PROMPTS[1:2], params)
    assert engine.stats().prefix_cache_hits_total > hits and again["0"].token_ids == want
    engine.step()  # idle, as the server's loop steps: the plan carries the releases
    assert engine.core.runner.penalties._rows == {}  # released when the request finished


def test_gpu_memory_utilization_budget_and_its_cpu_refusal(checkpoint_dirs):
    from kvsplice.model_source import load_config
    from server.engine.kv_budget import activation_bytes, utilization_budget

    gib = 2**30
    # vLLM's arithmetic: 0.9 of a 140 GiB GPU, 40 GiB in use (weights, other processes), 5 GiB reserved.
    assert utilization_budget(0.9, 140 * gib, 100 * gib, 5 * gib) == int(0.9 * 140 * gib) - 40 * gib - 5 * gib
    lite = load_config("deepseek-v2-lite")
    small = activation_bytes(lite, EngineConfig(max_num_batched_tokens=2048, max_num_seqs=64))
    large = activation_bytes(lite, EngineConfig(max_num_batched_tokens=16384, max_num_seqs=256))
    assert 0 < small < large < 4 * gib  # grows with the step, stays a small part of an H200
    with pytest.raises(ValueError, match="gpu_memory_utilization needs a GPU"):
        LLMEngine(EngineConfig(model=checkpoint_dirs["lite"], gpu_memory_utilization=0.9))


def test_penalty_state_sees_the_cached_prefix_and_counts_on_the_device():
    from server.engine.penalties import PenaltyState
    from server.engine.step import SeqWork

    params = SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=2.0, frequency_penalty=1.0)
    state = PenaltyState(vocab_size=10, device=torch.device("cpu"))
    # Admitted with its first 4 prompt tokens cached: only [5, 6] and the last prompt token computed.
    work = SeqWork("r", token_ids=[5, 6], start=4, new_blocks=[], resumed=True, sample=True, params=params,
                   num_output_tokens=0, num_prompt_tokens=6, cached_prompt_ids=[1, 2, 3, 4])
    state.see_prompt([work])
    state.record(torch.tensor([7]), [work])
    state.record(torch.tensor([7]), [work])
    logits = torch.full((1, 10), 4.0)
    out = state.apply(logits, [work])[0]
    assert out[[1, 2, 3, 4, 5, 6]].tolist() == [2.0] * 6  # prompt tokens, cached or not: 4 / 2
    assert out[7].item() == 4.0 / 2 - 2 * 1.0  # generated twice: repetition, then frequency twice
    assert out[[0, 8, 9]].tolist() == [4.0] * 3 and logits[0, 1] == 4.0  # untouched; input not modified
