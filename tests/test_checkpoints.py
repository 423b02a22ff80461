"""Small DeepSeek-V2 checkpoints, the tokenizer, the shipped configs and the committed corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP, DeepseekV2Moe

from kvsplice import checkpoints, corpus
from kvsplice.corpus import Document

VARIANTS = ("lite", "qlora")
PROMPT = "To be, or not to be, that is the question:"


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # Toy-sized matmuls gain nothing from threads, and on a busy 2-core machine the thread
    # hand-offs made each forward pass several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {v: checkpoints.build_small_checkpoint(root / v, v, seed=0) for v in VARIANTS}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(corpus.TOKENIZER_DIR)


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_loads_with_the_deepseek_v2_structure(built, variant):
    model = AutoModelForCausalLM.from_pretrained(built[variant])
    config = model.config
    assert type(model).__name__ == "DeepseekV2ForCausalLM" and config.model_type == "deepseek_v2"
    assert (config.hidden_size, config.num_hidden_layers, config.kv_lora_rank) == (128, 4, 64)
    rope = config.rope_parameters
    assert rope["rope_type"] == "yarn"
    assert rope["factor"] * rope["original_max_position_embeddings"] == \
        config.max_position_embeddings
    layers = model.model.layers
    assert isinstance(layers[0].mlp, DeepseekV2MLP)  # first_k_dense_replace = 1
    assert all(isinstance(layer.mlp, DeepseekV2Moe) for layer in layers[1:])
    assert layers[1].mlp.experts.gate_up_proj.shape[0] == 8
    attention = layers[0].self_attn
    if variant == "lite":
        assert attention.q_proj is not None and attention.q_a_proj is None
        assert config.topk_method == "greedy"
    else:
        assert attention.q_proj is None and attention.q_a_proj.out_features == 64
        assert (config.topk_method, config.n_group, config.topk_group) == \
            ("group_limited_greedy", 4, 2)
    # The latent the cache holds: kv_lora_rank + qk_rope_head_dim values per token.
    assert attention.kv_a_proj_with_mqa.out_features == 64 + 16


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_tokenizer_and_ids_agree(built, variant):
    tok = AutoTokenizer.from_pretrained(built[variant])
    model_config = AutoConfig.from_pretrained(built[variant])
    assert len(tok) == model_config.vocab_size == 8192
    assert model_config.bos_token_id == tok.bos_token_id
    assert model_config.eos_token_id == tok.eos_token_id == model_config.pad_token_id


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generate_follows_the_argmax(built, variant):
    model = AutoModelForCausalLM.from_pretrained(built[variant]).eval()
    tok = AutoTokenizer.from_pretrained(built[variant])
    inputs = tok(PROMPT, return_tensors="pt")
    n_prompt = inputs.input_ids.shape[1]
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, n_prompt + 5)
    assert torch.equal(out[:, :n_prompt], inputs.input_ids)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits
    # Each generated token is the argmax after the tokens before it (greedy, cache consistent).
    assert torch.equal(logits[0, n_prompt - 1:].argmax(-1), out[0, n_prompt:])
    again = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(out, again)


def test_same_seed_gives_the_same_bytes(built, tmp_path):
    again = checkpoints.build_small_checkpoint(tmp_path / "again", "lite", seed=0)
    other = checkpoints.build_small_checkpoint(tmp_path / "other", "lite", seed=1)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (built["lite"] / name).read_bytes(), name
    name = "model.embed_tokens.weight"
    first = load_file(built["lite"] / "model.safetensors")[name]
    assert not torch.equal(first, load_file(other / "model.safetensors")[name])


def test_building_does_not_disturb_the_callers_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    checkpoints.build_small_checkpoint(tmp_path / "m", "lite", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_router_spreads_tokens_over_experts(built, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(built["lite"]).eval()
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.std() > 0.01 and gate.weight.unique().numel() > 1000
    ids = tokenizer(corpus.committed_text_path("test").read_text()[:4000], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids, output_hidden_states=True).hidden_states[1]
    _, _, chosen = gate(model.model.layers[1].post_attention_layernorm(hidden))
    assert chosen.unique().numel() == 8


def test_overrides_and_unknown_variant():
    config = checkpoints.small_config("lite", num_hidden_layers=2, kv_lora_rank=32)
    assert (config.num_hidden_layers, config.kv_lora_rank) == (2, 32)
    with pytest.raises(ValueError, match="unknown variant"):
        checkpoints.small_config("v3")


def test_builtin_model_loads_and_generates():
    path = checkpoints.builtin_model_path()
    assert path.name == "kvsplice-tiny"
    assert sum(f.stat().st_size for f in path.iterdir()) < 40_000_000  # the bound for git
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "deepseek_v2" and model.config.q_lora_rank is None
    assert model.config.kv_lora_rank >= 128 and model.config.first_k_dense_replace == 1
    assert model.dtype == torch.bfloat16
    inputs = tok(PROMPT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs.input_ids.shape[1] + 3


# ---------------------------------------------------------------- shipped public configs


def test_shipped_deepseek_v2_lite_config():
    config = AutoConfig.from_pretrained(checkpoints.shipped_config_path("deepseek-v2-lite"))
    assert config.model_type == "deepseek_v2" and not hasattr(config, "auto_map")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == \
        (27, 2048, 16)
    assert config.q_lora_rank is None
    assert (config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim,
            config.v_head_dim) == (512, 128, 64, 128)
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_shared_experts,
            config.first_k_dense_replace, config.topk_method) == (64, 6, 2, 1, "greedy")
    cached_values = config.kv_lora_rank + config.qk_rope_head_dim
    assert cached_values == 576
    assert config.num_hidden_layers * cached_values * 2 == 31_104  # bf16 bytes per token


def test_shipped_deepseek_v2_config():
    config = checkpoints.shipped_config("deepseek-v2")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == \
        (60, 5120, 128)
    assert (config.q_lora_rank, config.kv_lora_rank) == (1536, 512)
    assert (config.n_routed_experts, config.n_group, config.topk_group,
            config.topk_method, config.routed_scaling_factor) == \
        (160, 8, 3, "group_limited_greedy", 16.0)


@pytest.mark.parametrize("name", sorted(checkpoints.SHIPPED_CONFIGS))
def test_shipped_configs_share_vocab_and_yarn(name):
    config = checkpoints.shipped_config(name)
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == \
        (102400, 100000, 100001)
    rope = config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == \
        ("yarn", 40, 4096)
    assert rope["mscale"] == rope["mscale_all_dim"] == 0.707
    assert config.max_position_embeddings == 40 * 4096


def test_unknown_shipped_config():
    with pytest.raises(KeyError, match="deepseek-v2-lite"):
        checkpoints.shipped_config_path("deepseek-v3")


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_any_utf8(tokenizer):
    text = "Whither, O Romeo? — naïve façade, “quoted”, Ærø, 日本語, 🤖\ttab  two  spaces\n\n "
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id is None
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids).startswith("<|begin_of_text|>")


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 8192 and tokenizer.model_max_length == 1024
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == \
        ("<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id != tokenizer.bos_token_id
    # Special tokens stay single tokens, and are not produced from their spelling in pieces.
    for token in ("<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|assistant|>"):
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1


def test_tokenizer_compresses_english(tokenizer):
    text = corpus.committed_text_path("test").read_text()[:20_000]
    n_tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
    assert len(text.encode()) / n_tokens > 3.0  # bytes per token: a trained BPE, not bytes


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "Speak plainly."},
                {"role": "user", "content": "Who art thou?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|begin_of_text|><|system|>\nSpeak plainly.<|end_of_text|>\n"
                    "<|user|>\nWho art thou?<|end_of_text|>\n<|assistant|>\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == text
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


# ---------------------------------------------------------------- corpus


def test_clean_text_normalises_whitespace_only():
    raw = "  Enter  Hamlet.\r\n\r\n\r\n\r\n\tHam.\tTo be,  or not?  \n"
    assert corpus.clean_text(raw) == "Enter Hamlet.\n\nHam. To be, or not?"


def test_split_keeps_editions_together():
    documents = [Document("s", f"play{i}", "x" * 1000) for i in range(60)]
    documents += [Document("s", f"play{i}", "folio " * 100, primary=False) for i in range(60)]
    splits = corpus.assign_splits(documents)
    works = {name: {d.work for d in members} for name, members in splits.items()}
    assert not (works["train"] & works["test"]) and not (works["train"] & works["validation"])
    assert all(d.primary for name in ("test", "validation") for d in splits[name])
    assert len(works["test"]) == len(works["validation"]) == 3  # 5% of 60 equal plays
    assert splits == corpus.assign_splits(list(reversed(documents)))  # order independent


def test_committed_corpus_files():
    test = corpus.read_documents(corpus.committed_text_path("test"))
    calib = corpus.read_documents(corpus.committed_text_path("calib"))
    assert 300_000 < sum(len(d.encode()) for d in test) < 650_000
    assert 100_000 < sum(len(d.encode()) for d in calib) < 200_000
    assert len(test) >= 4 and len(calib) >= 4
    # Held-out splits share no work: no long line of the calibration text is in the test text.
    test_lines = {line for d in test for line in d.splitlines() if len(line) > 60}
    assert not any(line in test_lines for d in calib for line in d.splitlines())
