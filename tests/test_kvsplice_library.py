"""The KVSplice library on transformers' DeepSeek-V2: patching, folding, sizing, calibration, storage."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from kvsplice import (
    LearnedKVSplice,
    SpliceFileMismatch,
    collect_latents,
    get_kv_cache_size,
    get_splices,
    load_splices,
    measure_cache_bytes,
    patch_model_with_kvsplice,
    pca_splices,
    reconstruction_error,
    save_splices,
    unpatch_model,
)
from kvsplice.model_source import load_config
from tests.model_fixtures import load

PROMPT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."


def encode(tokenizer, text: str = PROMPT, batch: int = 1) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text)] * batch)


def exact_inverse_splices(model) -> list[LearnedKVSplice]:
    """Full-rank splices with a random invertible encode and its exact inverse as decode."""
    gen = torch.Generator().manual_seed(1)
    splices = []
    for _ in range(model.config.num_hidden_layers):
        d = model.config.kv_lora_rank
        s = LearnedKVSplice(d, 1.0)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        a, a_inv = 2.0 * q, q.T / 2.0  # well conditioned, so float32 round-off stays small
        b = torch.randn(d, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            s.compress.weight.copy_(a.float())
            s.compress.bias.copy_(b.float())
            s.expand.weight.copy_(a_inv.float())
            s.expand.bias.copy_((-a_inv @ b).float())
        splices.append(s)
    return splices


def test_ratio_one_is_plain_mla(variant_model):
    _, _, model, tok = variant_model
    ids = encode(tok)
    ref = model(ids).logits
    patch_model_with_kvsplice(model, compression_ratio=1.0)
    assert torch.equal(model(ids).logits, ref)
    assert get_splices(model) == []  # no splice layer at all


def test_full_rank_exact_inverse_reproduces_logits(variant_model):
    _, _, model, tok = variant_model
    ids = encode(tok)
    ref = model(ids).logits
    patch_model_with_kvsplice(model, splices=exact_inverse_splices(model))
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    unpatch_model(model)
    assert torch.equal(model(ids).logits, ref)


def test_generate_at_half_ratio_caches_the_estimated_bytes(variant_model):
    _, _, model, tok = variant_model
    cfg = model.config
    patch_model_with_kvsplice(model, compression_ratio=0.5)
    ids = encode(tok, batch=2)
    cache = DynamicCache(config=cfg)
    new_tokens = 6
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, past_key_values=cache, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, ids.shape[1] + new_tokens)
    cached_len = ids.shape[1] + new_tokens - 1  # the last token is sampled, never fed back
    expected = get_kv_cache_size(cfg, batch_size=2, seq_len=cached_len, compression_ratio=0.5, dtype=torch.float32)
    assert expected.code_dim == cfg.kv_lora_rank // 2
    assert measure_cache_bytes(cache) == expected.total_bytes
    plain = get_kv_cache_size(cfg, 2, cached_len, 1.0, torch.float32)
    assert expected.total_bytes < plain.total_bytes


def test_estimator_counts_rope_dims_on_shipped_v2_lite():
    cfg = load_config("deepseek-v2-lite")
    per_token = [get_kv_cache_size(cfg, compression_ratio=r).bytes_per_token for r in (1.0, 0.5, 0.25)]
    assert per_token == [31_104, 17_280, 10_368]


def test_fp8_rows_match_flashmla_and_stack_with_the_splice():
    """fp8 code + one float32 scale + bf16 RoPE, 16-byte aligned: 656 B per layer at ratio 1.0,
    FlashMLA's row (17,712 B per token on V2-Lite); at 0.5 the two savings multiply (2.88x)."""
    cfg = load_config("deepseek-v2-lite")
    per_token = [get_kv_cache_size(cfg, compression_ratio=r, kv_cache_dtype="fp8").bytes_per_token
                 for r in (1.0, 0.5, 0.25)]
    assert per_token == [17_712, 10_800, 7_344]
    assert get_kv_cache_size(cfg, kv_cache_dtype="fp8_e5m2").bytes_per_token == 17_712
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        get_kv_cache_size(cfg, kv_cache_dtype="int8")


def test_estimate_cli_prints_breakdown():
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "estimate", "--model-config", "deepseek-v2-lite"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "31,104 (ratio 1.0) / 17,280 (ratio 0.5) / 10,368 (ratio 0.25)" in out
    fp8 = subprocess.run(
        [sys.executable, "-m", "server.cli", "estimate", "--compression-ratio", "0.5", "--kv-cache-dtype", "auto,fp8"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "17,280 (ratio 0.5) / 10,800 (ratio 0.5, fp8)" in fp8


def test_estimate_cli_names_the_bad_flag():
    res = subprocess.run(
        [sys.executable, "-m", "server.cli", "estimate", "--compression-ratio", "1.5"], capture_output=True, text=True
    )
    assert res.returncode == 2 and "--compression-ratio" in res.stderr


def calibration_batches(tok, text: str, window: int = 64) -> list[torch.Tensor]:
    ids = tok.encode(text)
    return [torch.tensor([ids[i : i + window]]) for i in range(0, len(ids) - window, window)]


def test_pca_reconstructs_held_out_latents_better_than_truncate(lite_model):
    from kvsplice.corpus import committed_text_path

    model, tok = lite_model
    text = committed_text_path("calib").read_text()[:40_000]
    batches = calibration_batches(tok, text)
    half = len(batches) // 2
    train = collect_latents(model, batches[:half])
    held_out = collect_latents(model, batches[half:])
    pca = pca_splices(train, 0.5)
    for layer, splice in enumerate(pca):
        truncate = LearnedKVSplice(splice.latent_dim, 0.5)
        pca_err = reconstruction_error(splice, held_out[layer])
        trunc_err = reconstruction_error(truncate, held_out[layer])
        assert pca_err < trunc_err, (layer, pca_err, trunc_err)


def test_folded_weights_match_explicit_decode_then_kv_b_proj():
    """Attention over codes with the folded up-projection == decode to the latent, then kv_b_proj."""
    torch.manual_seed(0)
    heads, nope, v_dim, latent, rope, n = 4, 16, 16, 64, 8, 10
    splice = LearnedKVSplice(latent, 0.5)
    splice.init_orthogonal(seed=3)
    with torch.no_grad():
        splice.expand.bias.normal_()  # a bias, to check it folds (K part cancels, V part adds)
    kv_b = torch.randn(heads * (nope + v_dim), latent)
    codes = torch.randn(n, splice.rank)
    q_nope, q_pe, k_pe = torch.randn(heads, nope), torch.randn(heads, rope), torch.randn(n, rope)

    def attend(kv: torch.Tensor) -> torch.Tensor:  # kv [n, H*(nope+v)] -> [H, v]
        kv = kv.view(n, heads, nope + v_dim)
        k, v = kv[..., :nope], kv[..., nope:]
        scores = torch.einsum("hd,nhd->hn", q_nope, k) + torch.einsum("hp,np->hn", q_pe, k_pe)
        return torch.einsum("hn,nhv->hv", scores.softmax(-1), v)

    explicit = attend(splice.decode(codes) @ kv_b.T)
    weight, bias = splice.fold_into_kv_b_proj(kv_b)
    folded = attend(codes @ weight.T + bias)
    torch.testing.assert_close(folded, explicit, rtol=1e-4, atol=1e-5)
    assert weight.shape == (heads * (nope + v_dim), splice.rank)


def test_wrong_layer_pattern_is_named(lite_model):
    model, _ = lite_model
    with pytest.raises(ValueError, match="layer_pattern 'transformer.h' found no list of layers"):
        patch_model_with_kvsplice(model, 0.5, layer_pattern="transformer.h")


def test_non_mla_model_is_refused():
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="no MLA latent cache: config.kv_lora_rank not found"):
        patch_model_with_kvsplice(model, 0.5)


def test_splice_file_for_another_model_is_refused(checkpoint_dirs, tmp_path):
    lite, _ = load(checkpoint_dirs["lite"])
    qlora, _ = load(checkpoint_dirs["qlora"])
    path = save_splices(tmp_path / "lite.safetensors", get_splices(patch_model_with_kvsplice(lite, 0.5)), lite)
    with pytest.raises(SpliceFileMismatch, match="another model architecture"):
        load_splices(path, qlora)
    # Same architecture, other weights: refused unless the caller insists.
    other = AutoModelForCausalLM.from_config(unpatch_model(lite).config)
    with pytest.raises(SpliceFileMismatch, match="calibrated on another model"):
        load_splices(path, other)
    assert len(load_splices(path, other, strict=False)) == lite.config.num_hidden_layers
    with pytest.raises(FileNotFoundError):
        load_splices(tmp_path / "missing.safetensors", lite)


def test_save_load_round_trip(lite_model, tmp_path):
    model, tok = lite_model
    splices = pca_splices(collect_latents(model, [encode(tok)]), 0.25)
    path = save_splices(tmp_path / "s.safetensors", splices, model, extra={"note": "test"})
    loaded = load_splices(path, model)
    assert [s.rank for s in loaded] == [s.rank for s in splices]
    for a, b in zip(splices, loaded):
        assert b.init_method == "pca" and b.compression_ratio == 0.25
        for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(ta, tb), name


def test_odd_code_width_runs_in_float32(lite_model):
    """0.7 of a 64-wide latent is 45 dims: the code is odd-width and transformers still finds an
    evenly aligned k_pe to rotate (it views it as complex numbers)."""
    model, tok = lite_model
    patch_model_with_kvsplice(model, compression_ratio=0.7)
    assert get_splices(model)[0].rank == 45
    ids = encode(tok, batch=2)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, ids.shape[1] + 4)
