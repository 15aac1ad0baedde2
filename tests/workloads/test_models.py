"""ModelSpec: exact parameter counts of published models and the model-FLOP closed forms."""
from __future__ import annotations

import dataclasses

import pytest

from plansim.workloads.model_io import load_model
from plansim.workloads.models import ModelError, ModelSpec


@pytest.mark.parametrize("name, params_b, tol_b", [
    ("llama3-8b", 8.03, 0.005),        # 8,030,261,248 (Meta model card: 8.03B)
    ("llama3-70b", 70.6, 0.05),        # 70,553,706,496
    ("gpt3-175b", 174.6, 0.05),        # 174,604,259,328 (GPT-3 paper: "175B")
    ("llama2-7b", 6.74, 0.005),        # 6,738,415,616
    ("llama2-13b", 13.02, 0.005),      # 13,015,864,320
    ("llama2-70b", 68.98, 0.005),      # 68,976,648,192
    ("llama3-405b", 405.85, 0.005),    # 405,853,388,800
    ("mixtral-8x7b", 46.70, 0.005),    # 46,702,792,704 (Mistral: 46.7B total)
    ("qwen2-7b", 7.62, 0.005),         # 7,615,616,512
    ("deepseek-moe-16b", 16.38, 0.01), # DeepSeekMoE paper: 16.4B total
    ("tinyllama-1.1b", 1.10, 0.005),   # 1,100,048,384
])
def test_param_counts_of_builtins(name, params_b, tol_b):
    assert load_model(name).num_params / 1e9 == pytest.approx(params_b, abs=tol_b)


def test_exact_counts():
    assert load_model("llama3-8b").num_params == 8_030_261_248
    assert load_model("llama2-7b").num_params == 6_738_415_616
    assert load_model("mixtral-8x7b").num_params == 46_702_792_704
    assert load_model("gpt3-175b").num_params == 174_604_259_328


@pytest.mark.parametrize("name, active_b, tol_b", [
    ("mixtral-8x7b", 12.9, 0.05),      # 12,879,925,248 (Mistral: 12.9B active)
    ("deepseek-moe-16b", 2.8, 0.05),   # DeepSeekMoE paper: 2.8B activated
])
def test_active_params_of_moe(name, active_b, tol_b):
    spec = load_model(name)
    assert spec.num_active_params / 1e9 == pytest.approx(active_b, abs=tol_b)
    assert spec.num_active_params < spec.num_params


def test_dense_active_equals_total():
    spec = load_model("llama3-8b")
    assert spec.num_active_params == spec.num_params


def test_deepseek_first_layer_is_dense():
    spec = load_model("deepseek-moe-16b")
    assert spec.first_dense_layers == 1
    assert not spec.is_moe_layer(0) and all(spec.is_moe_layer(i) for i in range(1, spec.num_layers))
    assert spec.num_moe_layers == spec.num_layers - 1


def _gpt(**kw) -> ModelSpec:
    base = dict(name="gpt", num_layers=24, hidden=2048, num_heads=16, num_kv_heads=16, ffn_hidden=8192,
                vocab=50304, mlp="gelu", norm="layernorm", position="learned", max_seq_len=2048,
                tied_embeddings=True, bias=True)
    base.update(kw)
    return ModelSpec(**base)


@pytest.mark.parametrize("seq_len", [1, 512, 2048, 8192])
@pytest.mark.parametrize("tied", [True, False])
def test_flops_closed_form_dense_gelu_gpt(seq_len, tied):
    """Dense GELU GPT, no GQA, f = 4h.  Forward FLOPs per token of one layer:
    QKV 2·3h² + out proj 2·h² + MLP 2·2·h·4h = 24h² (= 2 × the 12h² GEMM weights), plus attention
    scores QKᵀ and scores·V, 2·s·h each (no causal halving).  Logits 2·V·h.  Training = 3× forward:
        6·(12·L·h² + V·h) + 12·L·s·h = 6·(N_GEMM + V·h) + 12·L·s·h,
    N_GEMM the non-embedding GEMM weights (biases, norms and position embeddings are not GEMMs)."""
    spec = _gpt(tied_embeddings=tied)
    L, h, V, s = spec.num_layers, spec.hidden, spec.vocab, seq_len
    n_gemm = L * (4 * h * h + 2 * h * spec.ffn_hidden)
    assert n_gemm == 12 * L * h * h
    expected = 6 * (n_gemm + V * h) + 12 * L * s * h
    assert spec.model_flops_per_token(s) == pytest.approx(expected, rel=1e-9)


def test_flops_close_to_6n_plus_attention_for_llama():
    """For a large model, 6·N (N without the input embedding, which is a lookup) plus the
    attention term 12·L·s·q_dim is within a fraction of a percent of the exact count (the rest:
    norm weights counted in N but not in FLOPs)."""
    spec = load_model("llama3-70b")
    s = 8192
    n = spec.num_params - spec.vocab * spec.hidden  # untied: LM head stays in N
    approx = 6 * n + 12 * spec.num_layers * s * spec.q_dim
    assert spec.model_flops_per_token(s) == pytest.approx(approx, rel=1e-3)


def test_flops_gqa_and_swiglu_terms():
    spec = load_model("llama3-8b")
    L, h, s = spec.num_layers, spec.hidden, 4096
    kv = spec.kv_dim
    per_layer_fwd = 2 * h * (h + 2 * kv) + 2 * h * h + 2 * 3 * h * spec.ffn_hidden + 4 * s * h
    expected = 3 * (L * per_layer_fwd + 2 * h * spec.vocab)
    assert spec.model_flops_per_token(s) == pytest.approx(expected, rel=1e-12)


def test_flops_moe_counts_active_experts_and_router():
    spec = load_model("mixtral-8x7b")
    L, h, s = spec.num_layers, spec.hidden, 4096
    dense_like = dataclasses.replace(spec, num_experts=0, top_k=1)
    extra = 3 * L * (2 * 3 * h * spec.ffn_hidden * (spec.top_k - 1) + 2 * h * spec.num_experts)
    assert spec.model_flops_per_token(s) == pytest.approx(dense_like.model_flops_per_token(s) + extra, rel=1e-12)


def test_gpt2_style_param_count_is_exact():
    """GPT-2 small (124,439,808 parameters per the HF checkpoint)."""
    spec = _gpt(num_layers=12, hidden=768, num_heads=12, num_kv_heads=12, ffn_hidden=3072, vocab=50257,
                max_seq_len=1024)
    assert spec.num_params == 124_439_808


@pytest.mark.parametrize("overrides, match", [
    ({"hidden": 0}, "hidden: must be a positive integer"),
    ({"num_layers": -1}, "num_layers: must be a positive integer"),
    ({"num_heads": 7, "num_kv_heads": 7}, "num_heads: 7 must divide hidden 2048"),
    ({"num_kv_heads": 5}, "num_kv_heads: 5 must divide num_heads 16"),
    ({"mlp": "relu"}, "mlp: must be one of swiglu, gelu"),
    ({"norm": "batchnorm"}, "norm: must be one of"),
    ({"num_experts": -2}, "num_experts: must be a non-negative integer"),
])
def test_spec_validation_messages(overrides, match):
    with pytest.raises(ModelError, match=match):
        _gpt(**overrides)


def test_top_k_must_not_exceed_experts():
    with pytest.raises(ModelError, match="top_k: must be in 1..num_experts=8"):
        _gpt(num_experts=8, top_k=9)


def test_deepseek_v3_has_671b_parameters_37b_of_them_active():
    """DeepSeek-V3 (arXiv:2412.19437: "671B total parameters with 37B activated for each token"),
    from its Hugging Face config: multi-head latent attention in every layer, 3 dense layers then
    58 of 256 routed experts (top 8) and one shared expert; its multi-token-prediction layer is
    not counted (nor modelled)."""
    m = load_model("deepseek-v3")
    assert m.is_mla and (m.head_dim, m.v_head_dim, m.q_lora_rank, m.kv_lora_rank) == (192, 128, 1536, 512)
    h = 7168
    attention = (h * 1536 + 1536 + 1536 * 128 * 192  # query latent, its norm, up projection
                 + h * (512 + 64) + 512 + 512 * 128 * (128 + 128)  # key/value latent + rotary key, norm, up
                 + 128 * 128 * h)  # output projection
    assert m.attention_params == attention
    assert m.num_params == pytest.approx(671e9, rel=0.001)
    assert m.num_active_params == pytest.approx(37e9, rel=0.02)


@pytest.mark.parametrize("fields, message", [
    (dict(kv_lora_rank=64, qk_rope_head_dim=16, num_kv_heads=2), "num_kv_heads"),
    (dict(kv_lora_rank=64, qk_rope_head_dim=64), "qk_rope_head_dim"),
    (dict(q_lora_rank=96), "kv_lora_rank"),
    (dict(v_head_dim=32), "kv_lora_rank"),
])
def test_latent_attention_fields_are_checked(fields, message):
    base = dict(name="m", num_layers=2, hidden=512, num_heads=8, num_kv_heads=8, ffn_hidden=1024, vocab=1000,
                head_dim=64)
    with pytest.raises(ModelError, match=message):
        ModelSpec(**{**base, **fields})
