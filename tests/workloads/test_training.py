"""The training op graph against closed forms: FLOPs, model-state and activation memory.

* FLOPs: Megatron-LM's ``num_floating_point_operations`` (Narayanan et al. SC'21, appendix):
  per token 6·(weight-matrix parameters) + 12·L·s·h for the attention scores, i.e. "6·N
  plus attention terms".  The op graph's GEMMs (forward of every layer and the head, ×3 for
  backward) must add up to exactly that for a GPT with tp = 1.
* Model states: ZeRO (Rajbhandari et al., arXiv:1910.02054 §3.1, Fig. 1): 2Ψ + 2Ψ + 12Ψ,
  sharded per stage over N_d; Megatron's fp32 main grads (18Ψ; distributed optimizer
  6Ψ + 12Ψ/N_d); bf16-pure 8Ψ (DESIGN.md).
* Activations: Korthikanti et al. 2022 (arXiv:2205.05198) §4, Eq. 1-2 and §5 for a GPT layer
  with dropout, unfused attention: s·b·h·(34 + 5·a·s/h) and its TP, SP, selective and full
  recomputation variants.
"""
from __future__ import annotations

import dataclasses

import pytest

from plansim.simulator.costs.compute import attention_flops
from plansim.simulator.memory import model_state_bytes
from plansim.workloads.model_io import load_model
from plansim.workloads.models import ModelSpec
from plansim.workloads.ops import backward_ops, recompute_ops
from plansim.workloads.plan import Plan, PlanError
from plansim.workloads.training import FP8_CAST_BYTES, TrainingWorkload, local_vocab, split_layers

REL = 1e-9


# --- FLOPs -----------------------------------------------------------------------------------
def _matrix_params(m: ModelSpec) -> float:
    """Parameters that sit in GEMMs a token passes through (no biases, norms, embedding lookup;
    the logits matrix once, tied or not; MoE: top-k routed + shared experts and the router)."""
    total = 0.0
    for layer in range(m.num_layers):
        total += m.hidden * (m.q_dim + 2 * m.kv_dim) + m.q_dim * m.hidden
        if m.is_moe_layer(layer):
            width = m.moe_ffn_hidden * (m.top_k + m.shared_experts)
            total += m.mlp_matrices * m.hidden * width + m.hidden * m.num_experts
        else:
            total += m.mlp_matrices * m.hidden * m.ffn_hidden
    return total + m.vocab * m.hidden


@pytest.mark.parametrize("name", ["gpt3-175b", "llama3-8b", "llama3-70b", "llama2-7b", "mixtral-8x7b",
                                  "qwen2-7b"])
@pytest.mark.parametrize("seq_len", [1024, 2048, 8192])
def test_flops_per_token_is_6n_plus_attention(name, seq_len):
    m = load_model(name)
    attention = 12.0 * m.num_layers * seq_len * m.q_dim  # QKᵀ and ·V, fwd + bwd, no causal halving
    assert m.model_flops_per_token(seq_len) == pytest.approx(6.0 * _matrix_params(m) + attention, rel=REL)


def test_6n_dominates_for_a_large_model():
    """GPT-3 175B at s = 2048: 6·N is the bulk, attention a few percent (Kaplan et al. 2020)."""
    m = load_model("gpt3-175b")
    ratio = m.model_flops_per_token(2048) / (6.0 * m.num_params)
    assert 1.0 < ratio < 1.1


def _gpt(layers=4, hidden=512, heads=8, vocab=5000, seq=1024) -> ModelSpec:
    return ModelSpec(name="gpt-test", num_layers=layers, hidden=hidden, num_heads=heads, num_kv_heads=heads,
                     ffn_hidden=4 * hidden, vocab=vocab, mlp="gelu", norm="layernorm", position="learned",
                     bias=True, dropout=True, max_seq_len=seq, tied_embeddings=True)


def _forward_gemm_flops(w: TrainingWorkload) -> float:
    layers = sum(op.flops for i in range(w.model.num_layers) for op in w.layer_ops(i))
    return layers + sum(op.flops for op in w.head) + sum(op.flops for op in w.embedding)


@pytest.mark.parametrize("model", [_gpt(seq=2048), _gpt(layers=3, hidden=768, heads=12, vocab=50257, seq=2048),
                                   load_model("gpt3-175b")], ids=["gpt-small", "gpt-768", "gpt3-175b"])
@pytest.mark.parametrize("b, s", [(1, 1024), (2, 512), (4, 2048)])
def test_op_graph_gemm_flops_equal_model_flops(model, b, s):
    """Forward GEMMs of all layers + head, ×3, per token == ModelSpec.model_flops_per_token
    (unfused attention: the scores and ·V are GEMMs of the graph), plus, under Megatron, the
    logits of the vocabulary's padding rows (to a multiple of 128: 50,257 -> 50,304)."""
    for framework, padded in (("pytorch", model.vocab), ("megatron", -(-model.vocab // 128) * 128)):
        plan = Plan(tp=1, micro_batch=b, global_batch=b, seq_len=s, attention="unfused", framework=framework)
        w = TrainingWorkload(model, plan)
        padding = 6.0 * model.hidden * (padded - model.vocab)
        assert 3.0 * _forward_gemm_flops(w) / (b * s) == pytest.approx(model.model_flops_per_token(s) + padding,
                                                                        rel=REL), framework


@pytest.mark.parametrize("framework", ["megatron", "pytorch"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_backward_gemms_are_twice_forward_with_or_without_biases(bias, framework):
    """Every GEMM's backward is one input-gradient and (with a weight) one weight-gradient GEMM;
    a layer without biases (Llama) gets no extra product: 2× forward FLOPs, head included."""
    model = dataclasses.replace(_gpt(), bias=bias)
    plan = Plan(micro_batch=2, global_batch=2, seq_len=512, attention="unfused", framework=framework)
    w = TrainingWorkload(model, plan)
    for fwd in (w.dense_layer, w.head):
        b_ops, w_ops = backward_ops(fwd)
        assert sum(op.flops for op in b_ops + w_ops) == pytest.approx(2 * sum(op.flops for op in fwd), rel=REL)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_backward_is_twice_forward_and_recompute_adds_forward(recompute):
    model = _gpt()
    plan = Plan(micro_batch=2, global_batch=2, seq_len=512, attention="unfused", recompute=recompute)
    w = TrainingWorkload(model, plan)
    fwd = w.dense_layer
    b_ops, w_ops = backward_ops(fwd)
    f_flops = sum(op.flops for op in fwd)
    assert sum(op.flops for op in b_ops + w_ops) == pytest.approx(2 * f_flops, rel=REL)
    r_flops = sum(op.flops for op in recompute_ops(fwd, recompute))
    if recompute == "none":
        assert r_flops == 0
    elif recompute == "full":
        assert r_flops == pytest.approx(f_flops, rel=REL)
    else:  # the attention core only: QKᵀ and ·V, 4·b·s²·h
        assert r_flops == pytest.approx(4.0 * 2 * 512 ** 2 * model.hidden, rel=REL)


def test_tp_splits_layer_gemm_flops_evenly():
    model = _gpt(hidden=1024, heads=16)
    one = TrainingWorkload(model, Plan(seq_len=1024, attention="unfused"))
    for t in (2, 4, 8):
        w = TrainingWorkload(model, Plan(tp=t, seq_len=1024, attention="unfused"))
        assert sum(op.flops for op in w.dense_layer) * t == pytest.approx(sum(op.flops for op in one.dense_layer),
                                                                         rel=REL)


def _mla(q_lora: int = 96) -> ModelSpec:
    """A small model with multi-head latent attention (DeepSeek-V3's shape, scaled down)."""
    return ModelSpec(name="mla-test", num_layers=3, hidden=512, num_heads=8, num_kv_heads=8, ffn_hidden=1024,
                     vocab=4096, head_dim=48, q_lora_rank=q_lora, kv_lora_rank=64, qk_rope_head_dim=16, v_head_dim=32)


@pytest.mark.parametrize("q_lora", [96, 0], ids=["q-latent", "q-direct"])
def test_mla_op_graph_flops_equal_model_flops(q_lora):
    """Multi-head latent attention: the graph's GEMMs (down, up and output projections, MLP,
    head), ×3, plus the attention core at the query/key width for QKᵀ and the value width for ·V,
    per token == ModelSpec.model_flops_per_token (Megatron-LM's MLA count before its causal
    halving); the attention kernel counts the core at the two widths too."""
    m = _mla(q_lora)
    s = 1024
    w = TrainingWorkload(m, Plan(micro_batch=2, global_batch=2, seq_len=s, framework="pytorch"))
    core = 2.0 * s * m.num_heads * (m.head_dim + m.v_head_dim)  # per token per layer, forward
    assert 3.0 * (_forward_gemm_flops(w) / (2 * s) + m.num_layers * core) == pytest.approx(
        m.model_flops_per_token(s), rel=REL)
    op = next(op for op in w.dense_layer if op.kind == "attention")
    b, heads, _, d, sq, skv, _ = op.attention
    assert (d, op.v_head_dim) == (m.head_dim, m.v_head_dim)
    assert attention_flops(b, heads, d, sq, skv, False, "forward", op.v_head_dim) == pytest.approx(2 * s * core, rel=REL)


@pytest.mark.parametrize("sp", [True, False])
def test_mla_down_projections_are_whole_on_every_tp_rank(sp):
    """Megatron-Core builds MLA's down projections ``duplicated``: each TP rank holds them whole
    and runs them on its own sequence-parallel tokens (all the tokens without SP), the up and
    output projections split over TP as usual."""
    m, t = _mla(), 4
    one = TrainingWorkload(m, Plan(seq_len=1024))
    split = TrainingWorkload(m, Plan(tp=t, seq_len=1024, sequence_parallel=sp))
    whole = m.replicated_attention_params
    assert whole == 512 * 96 + 96 + 512 * (64 + 16) + 64
    layers = m.num_layers * ((m.attention_params - whole + m.dense_mlp_params) / t + whole + m.norm_params)
    rest = (m.embedding_params + m.lm_head_params) / t + m.final_norm_params
    assert split.chunk_params(split.chunks[0])[0] == pytest.approx(layers + rest, rel=REL)
    assert one.chunk_params(one.chunks[0])[0] == pytest.approx(m.num_params, rel=REL)
    down = sum(op.flops for op in one.dense_layer if op.name in ("q_down", "kv_down"))
    per_rank = sum(op.flops for op in split.dense_layer)
    total = sum(op.flops for op in one.dense_layer)
    assert per_rank * t == pytest.approx(total + (0 if sp else (t - 1) * down), rel=REL)


def test_mla_needs_fused_attention():
    with pytest.raises(PlanError, match="attention: unfused"):
        TrainingWorkload(_mla(), Plan(seq_len=1024, attention="unfused"))


# --- model states (ZeRO) -------------------------------------------------------------------------
PSI = 1_234_567_891.0


def _states(nd: int, **kw) -> float:
    plan = Plan(dp=nd, global_batch=nd, **kw)
    return model_state_bytes(PSI, plan).total


@pytest.mark.parametrize("nd", [1, 2, 8, 64, 1024])
def test_zero_stages_per_zero_paper(nd):
    assert _states(nd, zero=0) == pytest.approx(16 * PSI, rel=REL)
    assert _states(nd, zero=1) == pytest.approx(4 * PSI + 12 * PSI / nd, rel=REL)
    assert _states(nd, zero=2) == pytest.approx(2 * PSI + 14 * PSI / nd, rel=REL)
    assert _states(nd, zero=3) == pytest.approx(16 * PSI / nd, rel=REL)


@pytest.mark.parametrize("nd", [1, 4, 64])
def test_megatron_fp32_grads_and_bf16_pure(nd):
    assert _states(nd, fp32_grads=True) == pytest.approx(18 * PSI, rel=REL)
    assert _states(nd, zero=1, fp32_grads=True) == pytest.approx(6 * PSI + 12 * PSI / nd, rel=REL)
    assert _states(nd, precision="bf16-pure") == pytest.approx(8 * PSI, rel=REL)
    assert _states(nd, precision="fp8") == pytest.approx(16 * PSI, rel=REL)  # fp8 GEMMs, bf16-mixed storage


def test_zero_breakdown_and_context_parallel_sharding():
    """The distributed optimizer shards over dp·cp together (Megatron)."""
    plan = Plan(dp=4, cp=2, zero=1, global_batch=4, seq_len=2048)
    s = model_state_bytes(PSI, plan)
    assert (s.params, s.grads, s.optimizer) == pytest.approx((2 * PSI, 2 * PSI, 12 * PSI / 8), rel=REL)


def test_offloaded_states_leave_the_device():
    plan = Plan(offload={"optimizer": "cpu"})
    s = model_state_bytes(PSI, plan)
    assert s.optimizer == 0 and s.total == pytest.approx(4 * PSI, rel=REL)


# --- activations (Korthikanti et al. 2022) -----------------------------------------------------------
def _korthikanti_model(hidden=1024, heads=16, layers=4) -> ModelSpec:
    return ModelSpec(name="gpt-korthikanti", num_layers=layers, hidden=hidden, num_heads=heads,
                     num_kv_heads=heads, ffn_hidden=4 * hidden, vocab=51200, dropout=True, mlp="gelu",
                     norm="layernorm", position="learned", bias=True, max_seq_len=4096)


def _saved(model: ModelSpec, **plan_kw) -> float:
    plan = Plan(attention="unfused", **plan_kw)
    w = TrainingWorkload(model, plan)
    return w.saved_activation_bytes(w.dense_layer)


SHAPES = [(1024, 16, 1, 2048), (2048, 32, 2, 1024), (4096, 32, 1, 4096), (768, 12, 4, 512)]


@pytest.mark.parametrize("h, a, b, s", SHAPES)
def test_activation_bytes_no_parallelism(h, a, b, s):
    model = _korthikanti_model(h, a)
    assert _saved(model, micro_batch=b, global_batch=b, seq_len=s) == pytest.approx(
        s * b * h * (34 + 5 * a * s / h), rel=REL)


@pytest.mark.parametrize("h, a, b, s", SHAPES)
@pytest.mark.parametrize("t", [2, 4])
def test_activation_bytes_tp_without_sp(h, a, b, s, t):
    model = _korthikanti_model(h, a)
    got = _saved(model, tp=t, sequence_parallel=False, micro_batch=b, global_batch=b, seq_len=s)
    assert got == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)), rel=REL)


@pytest.mark.parametrize("h, a, b, s", SHAPES)
@pytest.mark.parametrize("t", [2, 4])
def test_activation_bytes_tp_with_sp(h, a, b, s, t):
    model = _korthikanti_model(h, a)
    got = _saved(model, tp=t, sequence_parallel=True, micro_batch=b, global_batch=b, seq_len=s)
    assert got == pytest.approx(s * b * h * (34 + 5 * a * s / h) / t, rel=REL)


@pytest.mark.parametrize("h, a, b, s", SHAPES)
@pytest.mark.parametrize("t, sp", [(1, False), (2, False), (4, False), (2, True), (4, True)])
def test_selective_recompute_drops_the_attention_term(h, a, b, s, t, sp):
    model = _korthikanti_model(h, a)
    got = _saved(model, tp=t, sequence_parallel=sp, micro_batch=b, global_batch=b, seq_len=s, recompute="selective")
    if sp:
        expected = s * b * h * 34 / t
    else:
        expected = s * b * h * (10 + 24 / t)
    assert got == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("h, a, b, s", SHAPES)
@pytest.mark.parametrize("t, sp", [(1, False), (2, False), (4, False), (2, True), (4, True)])
def test_full_recompute_keeps_the_layer_input(h, a, b, s, t, sp):
    model = _korthikanti_model(h, a)
    got = _saved(model, tp=t, sequence_parallel=sp, micro_batch=b, global_batch=b, seq_len=s, recompute="full")
    assert got == pytest.approx(2 * s * b * h / (t if sp else 1), rel=REL)


def test_flash_attention_saves_no_s_squared_tensor():
    """Flash attention keeps Q, K, V, O and the log-sum-exp: no 5·a·s²·b term, so the saved
    bytes grow linearly in s where the unfused layer grows quadratically."""
    model = _korthikanti_model()
    def flash(s):
        w = TrainingWorkload(model, Plan(seq_len=s))
        return w.saved_activation_bytes(w.dense_layer)
    assert flash(4096) / flash(2048) == pytest.approx(2.0, rel=1e-9)
    assert flash(2048) < _saved(model, seq_len=2048)


def test_recomputation_never_increases_saved_bytes():
    for model in (_korthikanti_model(), load_model("llama3-8b")):
        for attention in ("flash", "unfused"):
            saved = [TrainingWorkload(model, Plan(seq_len=2048, attention=attention, recompute=r))
                     for r in ("none", "selective", "full")]
            values = [w.saved_activation_bytes(w.dense_layer) for w in saved]
            assert values[0] >= values[1] >= values[2] > 0


def _op_sac(model: ModelSpec, **plan_kw) -> TrainingWorkload:
    return TrainingWorkload(model, Plan(framework="pytorch", recompute="selective-op", **plan_kw))


def test_op_sac_reruns_every_second_gemm_and_the_elementwise_ops():
    """torchtitan's op policy on a Llama block (aten.mm in order q, k, v, o, gate, up, down): k, the
    output projection and up are re-run, q, v, gate and down and the fused attention are kept; the
    norms, RoPE and SiLU·mul are re-run; the down projection's residual add is past the last tensor
    backward needs (non-reentrant checkpoint's early stop)."""
    w = _op_sac(load_model("llama3-8b"), seq_len=2048)
    rerun = {op.name.removesuffix(".recompute") for op in w.phases(w.dense_layer)["R"]}
    gemms = {op.name for op in w.dense_layer if op.kind == "gemm"}
    assert rerun & gemms == {"k", "proj", "mlp.up"}
    assert {"norm1", "rope", "norm2", "mlp.silu", "mlp.mul"} <= rerun
    assert "attention" not in rerun and "residual2" not in rerun


def test_op_sac_keeps_the_block_input_and_the_saved_outputs():
    """Saved: the block input, q (h wide), v (kv), the attention output and its fp32 log-sum-exp,
    gate and down (ffn and h wide): a closed form in the model's widths."""
    m = load_model("llama3-8b")
    b, s = 2, 2048
    w = _op_sac(m, micro_batch=b, global_batch=b, seq_len=s)
    t = b * s
    expected = 2 * t * (m.hidden + m.q_dim + m.kv_dim + m.q_dim + m.ffn_hidden + m.hidden) + 4 * b * m.num_heads * s
    assert w.saved_activation_bytes(w.dense_layer) == pytest.approx(expected, rel=REL)
    full = TrainingWorkload(m, Plan(framework="pytorch", recompute="full", micro_batch=b, global_batch=b, seq_len=s))
    none = TrainingWorkload(m, Plan(framework="pytorch", micro_batch=b, global_batch=b, seq_len=s))
    assert (full.saved_activation_bytes(full.dense_layer) < w.saved_activation_bytes(w.dense_layer)
            < none.saved_activation_bytes(none.dense_layer))


def test_op_sac_recomputes_less_than_full():
    m = load_model("llama3-8b")

    def rerun_flops(recompute: str) -> float:
        w = TrainingWorkload(m, Plan(framework="pytorch", recompute=recompute))
        return sum(op.flops for op in w.phases(w.dense_layer)["R"])

    assert 0 < rerun_flops("selective-op") < rerun_flops("full")


@pytest.mark.parametrize("fields, message", [
    (dict(recompute_layers=2), "recompute_layers: 2 needs recompute 'full'"),
    (dict(recompute_every=2, recompute="selective"), "recompute_every: 2 needs recompute 'full'"),
    (dict(recompute_every=2, recompute_layers=2, recompute="full"), "recompute_every: give recompute_layers"),
    (dict(recompute_every=0, recompute="full"), "recompute_every"),
])
def test_partial_recomputation_fields_are_checked(fields, message):
    with pytest.raises(PlanError, match=message):
        Plan(**fields)


def test_op_sac_is_pytorch_only():
    with pytest.raises(PlanError, match="recompute: 'selective-op'.*framework 'pytorch'"):
        Plan(recompute="selective-op")


# --- pipeline split ----------------------------------------------------------------------------
def test_split_llama3_405b_layers_like_meta():
    assert split_layers(126, 16) == [7] + [8] * 14 + [7]


@pytest.mark.parametrize("layers, stages", [(32, 4), (80, 8), (96, 8), (126, 16), (61, 4), (10, 3), (7, 7)])
def test_split_covers_every_layer_and_is_even_in_the_middle(layers, stages):
    counts = split_layers(layers, stages)
    assert sum(counts) == layers and len(counts) == stages and min(counts) >= 1
    middle = counts[1:-1]
    assert len(set(middle)) <= 1
    assert all(c <= max(counts) for c in (counts[0], counts[-1]))


def test_split_overrides():
    assert split_layers(126, 16, first=7, last=7) == [7] + [8] * 14 + [7]
    assert split_layers(30, 4, first=6) == [6, 8, 8, 8]
    assert split_layers(30, 4, last=6) == [8, 8, 8, 6]
    with pytest.raises(PlanError, match="first_stage_layers"):
        split_layers(30, 4, first=5, last=6)
    with pytest.raises(PlanError, match="pp"):
        split_layers(3, 4)


@pytest.mark.parametrize("first, last, stages", [(100, None, 2), (None, 32, 2), (31, None, 3), (16, 16, 3),
                                                 (5, None, 1)])
def test_split_overrides_never_leave_a_stage_without_layers(first, last, stages):
    """An override that would leave some stage with no (or negative) layers is refused."""
    with pytest.raises(PlanError, match="stage_layers"):
        split_layers(32, stages, first=first, last=last)


def test_workload_chunks_follow_the_split_and_interleave_ranks():
    model = dataclasses.replace(load_model("llama3-8b"))
    w = TrainingWorkload(model, Plan(pp=4, vpp=2, schedule="interleaved", global_batch=8, dp=1))
    assert [c.num_layers for c in w.chunks] == split_layers(32, 8)
    assert [c.rank for c in w.chunks] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert w.chunks[0].has_embedding and w.chunks[-1].has_head
    assert sum(c.has_embedding for c in w.chunks) == sum(c.has_head for c in w.chunks) == 1
    starts = [c.first_layer for c in w.chunks]
    assert starts == sorted(starts) and starts[0] == 0


def test_chunk_params_add_up_to_the_model():
    """Per-rank parameter shards over all chunks × tp == the model's parameters (norms are
    replicated over TP, so with tp = 1 the sum is exact)."""
    for name in ("llama3-8b", "gpt3-175b", "deepseek-moe-16b", "deepseek-v3"):
        m = load_model(name)
        w = TrainingWorkload(m, Plan(pp=4, dp=1, global_batch=4))
        total = sum(sum(w.chunk_params(c)) for c in w.chunks)
        extra = m.vocab * m.hidden if m.tied_embeddings else 0  # the head's copy of a tied embedding
        assert total == pytest.approx(m.num_params + extra, rel=REL)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_recomputation_covers_the_transformer_layers_only(recompute):
    """Megatron checkpoints transformer layers; the embedding and the logits + loss are not re-run
    (regression: full recomputation re-ran the logits GEMM of the last stage)."""
    w = TrainingWorkload(_gpt(), Plan(seq_len=512, recompute=recompute))
    assert w.phases(w.head)["R"] == [] and w.phases(w.embedding)["R"] == []
    layer_r = w.phases(w.dense_layer)["R"]
    if recompute == "full":
        assert [op.name for op in layer_r] == [f"{op.name}.recompute" for op in w.dense_layer]
    elif recompute == "none":
        assert layer_r == []


@pytest.mark.parametrize("tp", [1, 2])
def test_pytorch_checkpoint_stops_recomputing_after_the_last_kept_tensor(tp):
    """torch.utils.checkpoint (non-reentrant) stops once it has rebuilt every tensor backward
    needs: in a Llama block the down projection keeps its input, not its output, so it, its TP
    reduction and the residual add are not re-run (an 8B step on an H200 measured 55 ms of
    recomputed GEMMs against 77 ms for a whole forward: the down projection's share).
    Megatron's checkpoint, and a block whose dropout keeps a mask after the last GEMM, re-run
    everything."""
    llama = load_model("llama3-8b")
    pytorch = TrainingWorkload(llama, Plan(tp=tp, seq_len=1024, recompute="full", framework="pytorch",
                                           sequence_parallel=False))
    layer = pytorch.dense_layer
    r = [op.name.removesuffix(".recompute") for op in pytorch.phases(layer)["R"]]
    names = [op.name for op in layer]
    down = names.index("mlp.down")
    assert r == names[:down]
    skipped = sum(op.flops for op in layer[down:])
    assert skipped == pytest.approx(2 * 1024 * llama.hidden * llama.ffn_hidden / tp, rel=REL)
    megatron = TrainingWorkload(llama, Plan(tp=tp, seq_len=1024, recompute="full", sequence_parallel=False))
    assert len(megatron.phases(megatron.dense_layer)["R"]) == len(megatron.dense_layer)
    gpt = TrainingWorkload(_gpt(), Plan(seq_len=512, recompute="full", framework="pytorch"))
    assert len(gpt.phases(gpt.dense_layer)["R"]) == len(gpt.dense_layer)  # its dropout keeps a mask


def test_a_tied_embedding_is_held_once_where_the_output_layer_shares_its_stage():
    """GPT-style tied embeddings: at pp 1 the output layer is the embedding's own tensor; with
    pipelining the last stage holds a copy (Megatron all-reduces its gradient with the first)."""
    model = ModelSpec(name="tied", num_layers=4, hidden=1024, num_heads=16, num_kv_heads=16, ffn_hidden=4096,
                      vocab=32000, mlp="gelu", norm="layernorm", position="learned", max_seq_len=2048,
                      tied_embeddings=True, bias=True)
    one = TrainingWorkload(model, Plan(global_batch=1))
    assert sum(sum(one.chunk_params(c)) for c in one.chunks) == pytest.approx(model.num_params)
    two = TrainingWorkload(model, Plan(pp=2, global_batch=2))
    held = sum(sum(two.chunk_params(c)) for c in two.chunks)
    assert held == pytest.approx(model.num_params + model.vocab * model.hidden)


def test_moe_parallel_folding_routes_each_tp_ranks_own_tokens_to_whole_experts():
    """etp 1 (Megatron-Core's MoE parallel folding): no TP gather or reduce-scatter around the
    experts, each TP rank routes its 1/tp of the tokens, experts are whole (not split over tp) and
    spread over ep ranks of tp·dp; the all-to-all moves 1/tp of the legacy layout's bytes."""
    from plansim.simulator.stagecost import Groups
    from plansim.simulator.hardware import build_cluster
    model = load_model("mixtral-8x7b")
    legacy = TrainingWorkload(model, Plan(tp=2, dp=4, ep=4, global_batch=4, seq_len=4096))
    folded = TrainingWorkload(model, Plan(tp=2, dp=4, ep=8, etp=1, global_batch=4, seq_len=4096))

    def moe_ops(w):
        return {op.name: op for op in w.layer_ops(0)}

    old, new = moe_ops(legacy), moe_ops(folded)
    assert "moe.allgather" in old and "moe.reduce" in old
    assert "moe.allgather" not in new and "moe.reduce" not in new
    assert new["moe.dispatch"].comm_bytes == pytest.approx(old["moe.dispatch"].comm_bytes / 2)
    # legacy: 2·tokens·k rows at width f/2; folded: tokens·k rows at width f: the same expert FLOPs
    assert new["experts.up"].flops == pytest.approx(old["experts.up"].flops)
    assert new["experts.up"].gemm[1] == 2 * old["experts.up"].gemm[1]
    routed = model.num_experts * model.expert_params
    chunk = folded.chunks[0]
    assert folded.chunk_params(chunk)[1] == pytest.approx(routed * model.num_layers / 8)
    assert legacy.chunk_params(legacy.chunks[0])[1] == pytest.approx(routed * model.num_layers / 8)
    groups = Groups.of(folded.plan, build_cluster("h100-sxm", None, 1, 8))
    assert (groups.ep.size, groups.expert_dp.size) == (8, 1)
    with pytest.raises(PlanError, match="ep: 8 must divide dp·cp = 4"):
        Plan(tp=2, dp=4, ep=8, global_batch=4)
    with pytest.raises(PlanError, match="etp: 1 with tp > 1 needs sequence_parallel"):
        Plan(tp=2, dp=4, ep=8, etp=1, sequence_parallel=False, global_batch=4)


def test_moe_dispatcher_copies_every_routed_row_per_permutation_unless_fused():
    """Megatron-Core's alltoall dispatcher gathers the token copies into expert order before the
    all-to-all, regroups what it receives by local expert (only where a rank holds several experts
    and the EP group has several ranks), undoes both after the experts and weights the top-k
    outputs back per token, keeping the expert outputs for that weighting's backward; the fused
    dispatchers (DeepEP, HybridEP) do all of it inside the communication kernels."""
    model = load_model("mixtral-8x7b")  # 8 experts, top 2
    h, e = model.hidden, 2

    def moe_ops(**fields):
        plan = Plan(**{"dp": 4, "micro_batch": 1, "global_batch": 4, "seq_len": 4096, **fields})
        return {op.name: op for op in TrainingWorkload(model, plan).layer_ops(0)}

    routed = 4096 * model.top_k
    ops = moe_ops(ep=4)  # two experts per rank, four source ranks: both permutations
    for name in ("moe.permute", "moe.sort_chunks", "moe.unsort_chunks"):
        assert ops[name].bytes == 2 * routed * h * e and ops[name].bwd_bytes_factor == 1.0
    assert ops["moe.unpermute"].saved_bytes == routed * h * e
    names = list(ops)
    assert (names.index("moe.permute") < names.index("moe.dispatch") < names.index("moe.sort_chunks")
            < names.index("experts.up") < names.index("moe.unsort_chunks") < names.index("moe.combine")
            < names.index("moe.unpermute"))
    assert "moe.sort_chunks" not in moe_ops(ep=1) and "moe.permute" in moe_ops(ep=1)  # nothing received
    assert "moe.sort_chunks" not in moe_ops(dp=8, global_batch=8, ep=8)  # one expert per rank
    fused = moe_ops(ep=4, moe_dispatcher="fused")
    assert not {"moe.permute", "moe.sort_chunks", "moe.unsort_chunks", "moe.unpermute"} & set(fused)
    assert fused["moe.dispatch"].comm_bytes == ops["moe.dispatch"].comm_bytes
    with pytest.raises(PlanError, match="moe_dispatcher: 'deepep' is not one of alltoall, fused"):
        Plan(moe_dispatcher="deepep")


def test_expert_groups_follow_megatron_cores_expert_grid():
    """Experts are laid over tp·cp·dp as etp, ep, expert-dp (cp folds in): with tp 2, cp 2 and ep 4
    an EP group is 4 ranks 2 apart, inside one 8-GPU node, not 4 apart across two."""
    from plansim.simulator.hardware import build_cluster
    from plansim.simulator.stagecost import Groups
    plan = Plan(tp=2, cp=2, dp=4, ep=4, global_batch=4, seq_len=4096)
    groups = Groups.of(plan, build_cluster("h100-sxm", None, 2, 8))
    assert (groups.ep.size, groups.ep.ranks_per_node) == (4, 4)
    assert groups.expert_dp.size == plan.expert_dp == 2


def test_fp8_plans_cast_each_linear_gemms_operands_and_keep_the_output_layer_in_bf16():
    """Transformer Engine's recipe: every fp8 linear GEMM's input is cast (read bf16, write fp8 twice)
    before it and its output gradient in backward; the logits and the router stay bf16."""
    model = load_model("mixtral-8x7b")
    plan = Plan(tp=2, dp=4, ep=4, micro_batch=1, global_batch=4, seq_len=4096, precision="fp8")
    w = TrainingWorkload(model, plan)
    ops = w.moe_layer
    linear = [op for op in ops if op.kind == "gemm" and op.has_weight and op.name != "router"]
    assert linear and all(op.dtype == "fp8" for op in linear)
    casts = {op.name: op for op in ops if op.name.endswith(".fp8_cast")}
    assert set(casts) == {f"{op.name}.fp8_cast" for op in linear}
    for op in linear:
        m, n, k = op.gemm
        cast = casts[f"{op.name}.fp8_cast"]
        assert cast.bytes == FP8_CAST_BYTES * m * k and cast.bytes * cast.bwd_bytes_factor == FP8_CAST_BYTES * m * n
        assert ops.index(cast) == ops.index(op) - 1
    assert next(op for op in ops if op.name == "router").dtype == "bf16"
    assert next(op for op in w.head if op.name == "logits").dtype == "bf16"
    bf16 = TrainingWorkload(model, Plan(**{**plan.to_dict(), "precision": "bf16-mixed"}))
    assert not any(op.name.endswith(".fp8_cast") for op in bf16.moe_layer)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_megatron_pads_the_vocabulary_to_a_multiple_of_128_tp(tp):
    """GPT-2's 50,257 rows: Megatron's logits GEMM gets 128·tp-aligned rows (16-byte aligned N),
    eager PyTorch the unpadded vocabulary."""
    model = _gpt(vocab=50257)
    megatron = local_vocab(model, Plan(tp=tp, dp=1, micro_batch=1, global_batch=1))
    assert megatron * tp >= 50257 and (megatron * tp) % (128 * tp) == 0 and megatron * tp - 50257 < 128 * tp
    assert (megatron * 2) % 16 == 0
    assert local_vocab(model, Plan(tp=tp, framework="pytorch")) == -(-50257 // tp)


def test_fused_attention_defaults_to_what_each_framework_runs():
    """Transformer Engine (Megatron-Core) picks cuDNN's fused attention on Hopper and newer;
    PyTorch's SDPA runs FlashAttention-2.  An explicit choice is kept."""
    assert Plan().attention == "cudnn"
    assert Plan(framework="pytorch").attention == "flash"
    assert Plan(attention="flash").attention == "flash"
    with pytest.raises(PlanError, match="attention: 'fa3' is not one of flash, cudnn, unfused"):
        Plan(attention="fa3")
    with pytest.raises(PlanError, match="framework: 'jax' is not one of megatron, pytorch"):
        Plan(framework="jax")  # the bad field is named, not the attention it would have defaulted
    ops = TrainingWorkload(_gpt(), Plan(seq_len=1024)).dense_layer
    assert next(op for op in ops if op.kind == "attention").impl == "cudnn"


@pytest.mark.parametrize("framework", ["megatron", "pytorch"])
def test_fused_loss_keeps_the_16bit_logits_and_moves_fewer_bytes(framework):
    """flash-attn's xentropy (``cross_entropy="fused"``) keeps the bf16 logits and an fp32
    log-sum-exp per token, and moves 2 bytes per logit forward and 4 backward; the unfused loss
    keeps an fp32 softmax (4 bytes per logit) and moves more both ways."""
    model = _gpt(vocab=50257)
    plan = Plan(micro_batch=2, global_batch=2, seq_len=1024, framework=framework)
    tokens, vocab = 2 * 1024, local_vocab(model, plan)
    unfused = next(op for op in TrainingWorkload(model, plan).head if op.name == "cross_entropy")
    fused = next(op for op in TrainingWorkload(model, plan.replace(cross_entropy="fused")).head
                 if op.name == "cross_entropy")
    assert unfused.saved_bytes == pytest.approx(4 * tokens * vocab, rel=REL)
    assert fused.saved_bytes == pytest.approx(2 * tokens * vocab + 4 * tokens, rel=REL)
    assert fused.bytes == pytest.approx(2 * tokens * vocab, rel=REL)
    assert fused.bytes * fused.bwd_bytes_factor == pytest.approx(4 * tokens * vocab, rel=REL)
    assert unfused.bytes > fused.bytes
    assert unfused.bytes * unfused.bwd_bytes_factor > fused.bytes * fused.bwd_bytes_factor


@pytest.mark.parametrize("tp", [1, 4])
def test_transformer_engine_fp8_keeps_the_quantized_input_of_each_linear_layer(tp):
    """Transformer Engine saves an fp8 linear layer's quantized input (1 byte per element) for
    its weight gradient; flash attention's backward still reads its 16-bit output, which the
    output projection no longer holds, so attention keeps it.  torchao's float8 (eager
    PyTorch) keeps the 16-bit inputs."""
    from plansim.workloads.training import layer_forward_ops
    model = load_model("llama3-8b")
    plan = Plan(tp=tp, micro_batch=1, global_batch=1, seq_len=4096)
    for framework in ("megatron", "pytorch"):
        plan16 = plan.replace(framework=framework)
        saved16 = {op.name: op.saved_bytes for op in layer_forward_ops(model, plan16, moe=False)}
        saved8 = {op.name: op.saved_bytes for op in layer_forward_ops(model, plan16.replace(precision="fp8"), moe=False)}
        linear = [n for n in saved16 if n in ("qkv", "q", "proj", "mlp.up", "mlp.gate", "mlp.down") and saved16[n]]
        assert len(linear) >= 4
        if framework == "megatron":
            for name in linear:
                assert saved8[name] == pytest.approx(saved16[name] / 2, rel=1e-12)
            assert saved8["attention"] == pytest.approx(saved16["attention"] + saved16["proj"], rel=1e-12)
        else:
            assert {n: b for n, b in saved8.items() if not n.endswith(".fp8_cast")} == saved16
