"""Reading models: built-in names, HF config.json of each family, YAML specs, and the errors."""
from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from plansim.workloads.model_io import (builtin_models, list_models, load_model, model_from_dict,
                                        model_from_hf_config)
from plansim.workloads.models import ModelError

REQUIRED_BUILTINS = {"llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b", "llama3-405b",
                     "gpt3-175b", "mixtral-8x7b", "qwen2-7b", "deepseek-moe-16b", "tinyllama-1.1b"}


def write_json(tmp_path, cfg, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


# --- built-ins --------------------------------------------------------------------------------
def test_builtins_present_and_named_lower_case_with_dashes():
    names = set(builtin_models())
    assert REQUIRED_BUILTINS <= names
    assert all(n == n.lower() and "_" not in n and " " not in n for n in names)


@pytest.mark.parametrize("name", sorted(REQUIRED_BUILTINS))
def test_every_builtin_loads_with_its_name(name):
    spec = load_model(name)
    assert spec.name == name


def test_builtins_carry_their_source():
    df = list_models()
    assert (df["source"].str.len() > 0).all()


def test_list_models_table():
    df = list_models()
    assert isinstance(df, pd.DataFrame)
    for col in ("name", "params_b", "layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "experts"):
        assert col in df.columns
    row = df.set_index("name").loc["llama3-8b"]
    assert row["params_b"] == pytest.approx(8.03)
    assert (row["layers"], row["hidden"], row["heads"], row["kv_heads"]) == (32, 4096, 32, 8)
    assert df.set_index("name").loc["mixtral-8x7b", "experts"] == "8 (top 2)"


def test_gpt3_builtin_matches_paper():
    s = load_model("gpt3-175b")
    assert (s.num_layers, s.hidden, s.num_heads, s.vocab, s.max_seq_len) == (96, 12288, 96, 50257, 2048)
    assert (s.mlp, s.norm, s.position, s.bias, s.tied_embeddings) == ("gelu", "layernorm", "learned", True, True)


# --- HF config.json per family ----------------------------------------------------------------
LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "tie_word_embeddings": False, "hidden_act": "silu",
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0}


def test_hf_llama(tmp_path):
    spec = load_model(str(write_json(tmp_path, LLAMA3_8B)))
    assert spec.num_params == 8_030_261_248
    assert (spec.mlp, spec.norm, spec.position, spec.tied_embeddings) == ("swiglu", "rmsnorm", "rope", False)
    assert spec.num_kv_heads == 8 and spec.head_dim == 128 and spec.max_seq_len == 8192


def test_hf_name_from_checkpoint_directory(tmp_path):
    d = tmp_path / "Meta-Llama-3-8B"
    d.mkdir()
    write_json(d, LLAMA3_8B)
    assert load_model(str(d / "config.json")).name == "Meta-Llama-3-8B"
    assert load_model(str(d)).num_params == 8_030_261_248  # a checkpoint directory works too


def test_hf_llama_defaults_kv_heads_to_heads(tmp_path):
    cfg = {k: v for k, v in LLAMA3_8B.items() if k != "num_key_value_heads"}
    assert load_model(str(write_json(tmp_path, cfg))).num_kv_heads == 32


def test_hf_explicit_head_dim(tmp_path):
    cfg = dict(LLAMA3_8B, model_type="mistral", hidden_size=5120, num_attention_heads=32, head_dim=128,
               num_hidden_layers=2)
    spec = load_model(str(write_json(tmp_path, cfg)))
    assert spec.head_dim == 128 and spec.q_dim == 4096
    assert spec.attention_params == 5120 * (4096 + 2 * 1024) + 4096 * 5120


def test_hf_mistral(tmp_path):
    cfg = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "sliding_window": 4096,
           "max_position_embeddings": 32768, "hidden_act": "silu", "tie_word_embeddings": False}
    assert load_model(str(write_json(tmp_path, cfg))).num_params == 7_241_732_096  # Mistral-7B-v0.1


def test_hf_mixtral(tmp_path):
    cfg = dict(LLAMA3_8B, model_type="mixtral", vocab_size=32000, max_position_embeddings=32768,
               num_local_experts=8, num_experts_per_tok=2)
    spec = load_model(str(write_json(tmp_path, cfg)))
    assert (spec.num_experts, spec.top_k) == (8, 2)
    assert spec.num_params == 46_702_792_704
    assert spec.num_active_params == 12_879_925_248


def test_hf_qwen2_has_qkv_bias(tmp_path):
    cfg = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
           "max_position_embeddings": 131072, "tie_word_embeddings": False, "rms_norm_eps": 1e-6}
    spec = load_model(str(write_json(tmp_path, cfg)))
    assert spec.qkv_bias and not spec.bias
    assert spec.num_params == 7_615_616_512  # Qwen2-7B


def test_hf_qwen2_moe_shared_expert(tmp_path):
    cfg = {"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
           "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936, "num_experts": 60,
           "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
           "decoder_sparse_step": 1, "max_position_embeddings": 8192, "tie_word_embeddings": False}
    spec = load_model(str(write_json(tmp_path, cfg)))
    assert (spec.num_experts, spec.top_k, spec.shared_experts, spec.moe_ffn_hidden) == (60, 4, 4, 1408)
    # Qwen1.5-MoE-A2.7B has 14,315,784,192 parameters; the shared expert's 1×h sigmoid gate
    # (24 × 2048) is not modelled.
    assert spec.num_params == 14_315_784_192 - 24 * 2048
    assert spec.num_active_params / 1e9 == pytest.approx(2.69, abs=0.01)


def test_hf_qwen2_moe_rejects_mlp_only_layers(tmp_path):
    cfg = {"model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 100, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "mlp_only_layers": [0]}
    with pytest.raises(ModelError, match="mlp_only_layers"):
        load_model(str(write_json(tmp_path, cfg)))


def test_hf_llama_with_another_gate_is_refused(tmp_path):
    """A gated MLP other than SiLU's is not the SwiGLU the cost model charges."""
    with pytest.raises(ModelError, match="hidden_act 'relu' not supported"):
        load_model(str(write_json(tmp_path, dict(LLAMA3_8B, hidden_act="relu"))))


@pytest.mark.parametrize("fields, message", [
    (dict(tied_embeddings="maybe"), "tied_embeddings: must be true or false"),
    (dict(num_experts=4, top_k=2, first_dense_layers=4), "first_dense_layers: 4 leaves no MoE layer"),
])
def test_spec_fields_checked(fields, message):
    base = dict(name="m", num_layers=4, hidden=256, num_heads=4, num_kv_heads=4, ffn_hidden=512, vocab=1000)
    with pytest.raises(ModelError, match=message):
        model_from_dict({**base, **fields})


def test_hf_deepseek_moe(tmp_path):
    cfg = {"model_type": "deepseek", "hidden_size": 2048, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "num_hidden_layers": 28, "num_attention_heads": 16,
           "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
           "first_k_dense_replace": 1, "moe_layer_freq": 1, "vocab_size": 102400,
           "max_position_embeddings": 4096, "tie_word_embeddings": False}
    spec = load_model(str(write_json(tmp_path, cfg)))
    assert spec == dataclasses.replace(load_model("deepseek-moe-16b"), name=spec.name)
    assert (spec.first_dense_layers, spec.shared_experts, spec.num_moe_layers) == (1, 2, 27)


def test_hf_gpt2(tmp_path):
    cfg = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
           "n_positions": 1024, "vocab_size": 50257, "activation_function": "gelu_new"}
    spec = load_model(str(write_json(tmp_path, cfg)))
    assert spec.ffn_hidden == 3072
    assert (spec.mlp, spec.norm, spec.position, spec.bias, spec.tied_embeddings) == (
        "gelu", "layernorm", "learned", True, True)
    assert spec.num_params == 124_439_808  # openai-community/gpt2


def test_hf_gpt2_without_model_type(tmp_path):
    cfg = {"n_embd": 1024, "n_layer": 24, "n_head": 16, "n_positions": 1024, "vocab_size": 50257}
    assert load_model(str(write_json(tmp_path, cfg))).num_params == 354_823_168  # gpt2-medium


def test_hf_gpt_neox(tmp_path):
    cfg = {"model_type": "gpt_neox", "hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12,
           "intermediate_size": 3072, "vocab_size": 50304, "max_position_embeddings": 2048, "rotary_pct": 0.25,
           "use_parallel_residual": True, "hidden_act": "gelu", "tie_word_embeddings": False}
    spec = load_model(str(write_json(tmp_path, cfg)))
    assert (spec.mlp, spec.norm, spec.position, spec.bias, spec.tied_embeddings) == (
        "gelu", "layernorm", "rope", True, False)
    assert spec.num_params == 162_322_944  # EleutherAI/pythia-160m


# --- YAML specs -------------------------------------------------------------------------------
def test_yaml_spec(tmp_path):
    path = tmp_path / "my-model.yaml"
    path.write_text("# a comment\n_source: test\nnum_layers: 2\nhidden: 256\nnum_heads: 4\nnum_kv_heads: 2\n"
                    "ffn_hidden: 512\nvocab: 1000\n")
    spec = load_model(str(path))
    assert spec.name == "my-model" and spec.head_dim == 64 and spec.mlp == "swiglu"


def test_yaml_round_trip_of_builtin(tmp_path):
    import yaml
    spec = load_model("mixtral-8x7b")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    assert load_model(str(path)) == spec


def test_model_from_dict_unknown_field():
    with pytest.raises(ModelError, match=r"spec: unknown field 'layers'; allowed: name, num_layers"):
        model_from_dict({"layers": 2})


# --- errors: one line, naming the file and field ----------------------------------------------
def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_unknown_name_lists_builtins():
    with pytest.raises(ModelError) as e:
        load_model("llama9")
    msg = one_line(e)
    assert msg.startswith("unknown model 'llama9'; built-in: ")
    assert "llama3-8b" in msg and "gpt3-175b" in msg


def test_missing_file(tmp_path):
    with pytest.raises(ModelError) as e:
        load_model(str(tmp_path / "nope" / "config.json"))
    assert "model file not found" in one_line(e)


def test_malformed_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 4096,,}')
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert one_line(e).startswith(f"{path}: not valid JSON (line 1")


def test_malformed_yaml(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("num_layers: [1, 2\nhidden: 3\n")
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert "not valid YAML" in one_line(e)


def test_json_not_an_object(tmp_path):
    with pytest.raises(ModelError, match="top level must be a JSON object"):
        load_model(str(write_json(tmp_path, [1, 2])))


@pytest.mark.parametrize("field", ["num_attention_heads", "hidden_size", "num_hidden_layers", "vocab_size",
                                   "intermediate_size"])
def test_missing_field(tmp_path, field):
    cfg = {k: v for k, v in LLAMA3_8B.items() if k != field}
    path = write_json(tmp_path, cfg)
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert one_line(e) == f"{path}: {field} missing"


@pytest.mark.parametrize("field, value", [("hidden_size", 0), ("num_hidden_layers", -4), ("vocab_size", 1.5),
                                          ("intermediate_size", "big")])
def test_non_positive_or_non_integer_size(tmp_path, field, value):
    path = write_json(tmp_path, dict(LLAMA3_8B, **{field: value}))
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert one_line(e) == f"{path}: {field} must be a positive integer, got {value!r}"


def test_heads_not_dividing_hidden(tmp_path):
    path = write_json(tmp_path, dict(LLAMA3_8B, num_attention_heads=30, num_key_value_heads=10))
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert one_line(e).startswith(f"{path}: num_attention_heads 30 must divide hidden_size 4096")


def test_kv_heads_not_dividing_heads(tmp_path):
    path = write_json(tmp_path, dict(LLAMA3_8B, num_key_value_heads=5))
    with pytest.raises(ModelError, match="num_key_value_heads 5 must divide num_attention_heads 32"):
        load_model(str(path))


def test_gpt2_heads_not_dividing_hidden(tmp_path):
    path = write_json(tmp_path, {"n_embd": 100, "n_layer": 2, "n_head": 3, "vocab_size": 10})
    with pytest.raises(ModelError, match="n_head 3 must divide n_embd 100"):
        load_model(str(path))


def test_unsupported_model_type(tmp_path):
    path = write_json(tmp_path, dict(LLAMA3_8B, model_type="mamba"))
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert "model_type 'mamba' not supported; allowed: llama, mistral" in one_line(e)


def test_yaml_non_positive_size_names_file_and_field(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("num_layers: 0\nhidden: 256\nnum_heads: 4\nnum_kv_heads: 4\nffn_hidden: 512\nvocab: 1000\n")
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert one_line(e) == f"{path}: num_layers: must be a positive integer, got 0"


def test_yaml_missing_field(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("num_layers: 2\nhidden: 256\n")
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert one_line(e).startswith(f"{path}: num_heads missing (required: ")


def test_wrong_suffix(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("x")
    with pytest.raises(ModelError, match=r"unknown model file type '.txt'; allowed: .json"):
        load_model(str(path))


def test_model_from_hf_config_direct():
    spec = model_from_hf_config(LLAMA3_8B, name="x")
    assert spec.name == "x" and spec.num_params == 8_030_261_248


def test_deepseek_v2_lite_reads_latent_attention_without_a_query_latent(tmp_path):
    """DeepSeek-V2-Lite's config.json: ``q_lora_rank`` null (queries projected straight from the
    hidden state), keys and values from a 512-wide latent; head_dim = qk_nope + qk_rope."""
    cfg = {"model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944, "num_hidden_layers": 27,
           "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 102400, "hidden_act": "silu",
           "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
           "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
           "moe_intermediate_size": 1408, "first_k_dense_replace": 1, "moe_layer_freq": 1}
    m = load_model(str(write_json(tmp_path, cfg)))
    assert (m.is_mla, m.q_lora_rank, m.kv_lora_rank, m.head_dim, m.v_head_dim) == (True, 0, 512, 192, 128)
    assert m.replicated_attention_params == 2048 * (512 + 64) + 512
    assert m.num_params / 1e9 == pytest.approx(15.7, abs=0.1)  # DeepSeek-V2-Lite: 15.7B total
