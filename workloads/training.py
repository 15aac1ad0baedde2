"""Model + Plan → the operator graph of one training iteration for one rank of each stage.

Per layer (Megatron-LM's tensor-parallel transformer, Shoeybi et al. 2019; sequence
parallelism per Korthikanti et al. 2022): norm, [all-gather], QKV GEMM, RoPE, attention core,
output GEMM, all-reduce or [reduce-scatter], residual, norm, [all-gather], MLP GEMMs and
activation, down GEMM, all-reduce or [reduce-scatter], residual.  MoE layers replace the MLP
by router, all-to-all dispatch, expert GEMMs and all-to-all combine.  The first stage adds the
embedding, the last the final norm, logits GEMM and cross-entropy loss.  Context parallelism
adds the K/V exchange (ring attention, or Llama 3's all-gather) beside the attention core.
``Plan.framework`` picks Megatron's fused kernels or eager PyTorch modules (separate q/k/v and
gate/up projections, unfused RoPE, SwiGLU, masking and dropout-then-add).

Saved-tensor accounting follows Korthikanti et al. 2022 §4.1 tensor by tensor (each tensor
is charged to exactly one op), so that for a GPT layer with dropout the sum is
s·b·h·(34 + 5·a·s/h) bytes, divided by t with sequence parallelism.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import NamedTuple

from plansim.workloads.models import ModelSpec
from plansim.workloads.ops import NORM_BACKWARD_PASSES, NORM_PASSES, Op, backward_ops, norm_bytes, op_sac_saved, recompute_ops
from plansim.workloads.plan import Plan, PlanError

ACT_BYTES = 2  # activations are 16-bit in every precision mode (fp8 changes GEMM inputs: _with_fp8_casts)
FP8_BYTES = 1


def gemm_dtype(plan: Plan) -> str:
    """The dtype of the transformer layers' linear GEMMs (fp8 plans run those in fp8; the
    output layer, the MoE router and attention's batched products stay in bf16, as in
    Megatron-Core with Transformer Engine and in torchao's float8 training)."""
    return "fp8" if plan.precision == "fp8" else "bf16"


#: HBM bytes per element of an fp8 GEMM operand's cast: Transformer Engine's cast-transpose reads
#: the bf16 tensor once and writes it as fp8 twice, row-major for this GEMM and transposed for the
#: other GEMM that contracts over the other dimension (Hopper's fp8 GEMMs take only the TN
#: layout): 2 + 1 + 1.  Forward casts the GEMM's input X[m,k]; backward the output gradient
#: dY[m,n], which both dgrad and wgrad read.  Priced as a memory-bound op; measured, a bf16 → fp8
#: cast streams at ~3.2 TB/s on an H200, 18 % below that rate (validation/data/fp8-h200-x1, kind
#: ``cast``, held out).  Weight casts are not charged: once per step at most (cached over
#: micro-batches, or none with fp8 parameters).
FP8_CAST_BYTES = 4.0


def _with_fp8_casts(ops: list[Op], plan: Plan) -> list[Op]:
    """``ops`` with the cast of each fp8 linear GEMM's operands before it (FP8_CAST_BYTES).

    Transformer Engine (``framework="megatron"``) keeps the quantized input of an fp8 linear
    layer for its weight gradient, 1 byte per element, not the 16-bit one
    (``transformer_engine/pytorch/module/linear.py``: the input's column-wise fp8 data is saved
    and its row-wise data discarded; ``save_original_input`` is off by default).  torchao's float8
    training, eager PyTorch's, keeps the 16-bit input."""
    out: list[Op] = []
    for op in ops:
        if op.kind == "gemm" and op.dtype == "fp8" and op.has_weight:
            m, n, k = op.gemm
            out.append(Op(f"{op.name}.fp8_cast", "memory", bytes=FP8_CAST_BYTES * m * k, bwd_bytes_factor=n / k,
                          recompute_selective=op.recompute_selective))
            if plan.framework == "megatron":
                op = replace(op, saved_bytes=op.saved_bytes * FP8_BYTES / ACT_BYTES)
        out.append(op)
    return out


def _tp_comm(name: str, nbytes: float, plan: Plan, sequence_parallel_op: str, gemm: str = "") -> Op:
    """The TP collective after a row-parallel GEMM or before a column-parallel one (``gemm``).

    Megatron's g (after a row-parallel GEMM) all-reduces forward and does nothing backward; its f
    (before a column-parallel GEMM) does nothing forward and all-reduces the input gradient
    backward.  With sequence parallelism g is a reduce-scatter and f an all-gather, each with the
    other as its backward.  With ``plan.tp_backward_overlap`` f's backward collective runs beside the
    weight-gradient GEMM of its column-parallel GEMM (Megatron-LM's asynchronous TP all-reduce,
    2021 on, and its reduce-scatter under sequence parallelism).  With ``plan.tp_comm_overlap``
    (userbuffers, AsyncTP) the rest are pipelined with their GEMM too: f's all-gather with the
    column-parallel GEMM it feeds, g's reduce-scatter with the row-parallel GEMM it drains, and
    g's backward all-gather with that GEMM's input gradient.
    """
    if plan.tp == 1:
        return Op(name, "collective", collective="none", group="tp")
    pipelined = gemm if plan.tp_comm_overlap and plan.sequence_parallel else ""
    if sequence_parallel_op == "all_gather":  # f
        beside = f"{gemm}.wgrad" if gemm and (plan.tp_backward_overlap or pipelined) else ""
        forward = "all_gather" if plan.sequence_parallel else "none"
        backward = "reduce_scatter" if plan.sequence_parallel else "all_reduce"
        return Op(name, "collective", collective=forward, bwd_collective=backward, group="tp", comm_bytes=nbytes,
                  hidden_by=pipelined, bwd_hidden_by=beside)
    if plan.sequence_parallel:  # g
        return Op(name, "collective", collective="reduce_scatter", group="tp", comm_bytes=nbytes,
                  hidden_by=pipelined, bwd_hidden_by=f"{pipelined}.dgrad" if pipelined else "")
    return Op(name, "collective", collective="all_reduce", bwd_collective="none", group="tp", comm_bytes=nbytes)


def _regather(column_gemm: str, nbytes: float, plan: Plan) -> list[Op]:
    """Megatron under sequence parallelism saves a column-parallel GEMM's input sharded and
    all-gathers it again in backward for the weight gradient, beside the input-gradient GEMM
    when ``plan.tp_backward_overlap`` (Korthikanti et al. 2022 §4.2.2).  Placed after the GEMM in
    forward order so that its backward comes before the GEMM's."""
    if not (plan.tp > 1 and plan.sequence_parallel and plan.framework == "megatron"):
        return []
    beside = f"{column_gemm}.dgrad" if plan.tp_backward_overlap else ""
    return [Op(f"{column_gemm}.regather", "collective", collective="none", bwd_collective="all_gather", group="tp",
               comm_bytes=nbytes, bwd_hidden_by=beside)]


#: Eager RoPE's kernels are bound by the SMs, not by HBM: on transposed views the multiply by a
#: broadcast cos/sin runs at 1.18-1.27 TB/s and the half-width cat at 0.93-1.01 on both the H100
#: and the H200 (132 SMs each; the H200's extra HBM bandwidth buys nothing), against 2.5-4.0 for
#: an add.  Weighted by the bytes each kernel moves (multiplies and negation 5 passes, cat 2, add
#: 3): 10 / (5/mul + 2/cat + 3/add) = 1.29 TB/s (H100), 1.45 (H200); per SM, their mean over
#: 132 SMs.  Measured by the profile suite (validation/data/h100-x1/ and h200-x1/profile/layout.csv); other
#: GPUs are assumed to reach the same rate per SM.
EAGER_ROPE_SM_RATE = 1.367e12 / 132
#: Eager ``masked_fill_`` of the causal mask on the [b, heads, s, s] scores (a broadcast bool
#: mask; PyTorch's non-vectorised TensorIterator kernel) is SM-bound like eager RoPE: 1.46 TB/s
#: on the H200 and 1.37 on the H100, whose HBM is 30 % slower (profile suite,
#: profile_kernels.csv in validation/data/h200-x2/profile/ and h100-x1/profile2/: the forward
#: and backward fills of gpt-1.7b at micro-batch 2).  The rate per SM is the H200's over its 132 SMs: the H100's
#: profile is of a step held out for validation, so it only checks that the rate is per SM.
EAGER_MASKED_FILL_SM_RATE = 1.46e12 / 132
#: Autograd's copies of the [b, heads, s, s] gradient when ``masked_fill_`` ran in place on a
#: view of the scores (Megatron's unfused ``attention_mask_func``): CopySlices clones the
#: gradient and its slice, the fill's backward clones it again, and the result is copied back,
#: four copies of 2 bytes read + 2 written per element, after the gradient was written into a
#: zero-filled buffer of the base's size (one more write of 2 bytes).  torch 2.14's dispatcher
#: on CPU lists ``new_zeros``, three ``copy_`` and a ``clone``; the H100 and H200 profiles of
#: gpt-1.7b show the fill (3 ms per step at micro-batch 2) and the device-to-device copies
MASKED_FILL_VIEW_COPIES = 4
#: HBM bytes per element of one autograd gradient sum (read two gradients, write one)
GRAD_SUM_BYTES = 3 * ACT_BYTES
#: HBM bytes per element of eager softmax's separate ``tmp = grad * output`` kernel (PyTorch's
#: softmax_backward_cuda_out; the profile suite sees it as a bf16 binary multiply as long as the
#: reduction kernel after it: 9.5 ms each in gpt-1.7b's step at micro-batch 2 on the H100)
SOFTMAX_GRAD_PRODUCT_BYTES = 3 * ACT_BYTES


def _norm(name: str, model: ModelSpec, tokens: float, readers: int = 1, width: int | None = None) -> Op:
    """RMSNorm or LayerNorm over ``tokens`` rows of ``width`` (the hidden size unless given);
    saves its input for backward.

    Its input is the residual stream, which the residual add reads too: backward sums the two
    gradients (one add).  Its output feeds ``readers`` GEMMs (eager q, k and v: three; fused
    QKV: one), whose input gradients are summed as well (readers − 1 adds)."""
    width = width or model.hidden
    elements = tokens * width
    return Op(name, "norm", bytes=norm_bytes(tokens, width), saved_bytes=elements * ACT_BYTES,
              bwd_bytes_factor=NORM_BACKWARD_PASSES / NORM_PASSES, bwd_extra_bytes=GRAD_SUM_BYTES * elements * readers)


def _residual(name: str, elements: float, dropout: bool, eager: bool) -> Op:
    """Residual add, after dropout when the model has it.  Megatron fuses bias, dropout and add
    into one kernel (read x and the residual, write the sum and a 1-byte mask: 7 bytes per
    element); eager PyTorch runs dropout (read, write, mask: 5) and then the add (6)."""
    e = ACT_BYTES
    if not dropout:
        return Op(name, "memory", bytes=3 * e * elements, bwd_bytes_factor=1.0)
    per_element = (2 * e + 1) + 3 * e if eager else 3 * e + 1
    return Op(name, "memory", bytes=per_element * elements, saved_bytes=elements * 1.0,
              bwd_bytes_factor=(2 * e + 1) / per_element)


def layer_forward_ops(model: ModelSpec, plan: Plan, moe: bool) -> list[Op]:
    """Forward ops of one transformer layer for one micro-batch on one rank."""
    t, e = plan.tp, ACT_BYTES
    tokens = plan.micro_batch * (plan.seq_len // plan.cp)
    h = model.hidden
    sp = plan.tp > 1 and plan.sequence_parallel
    tok_sp = tokens / t if sp else tokens  # tokens a rank holds outside the TP region
    heads = model.num_heads // t
    dtype = gemm_dtype(plan)
    drop = model.dropout
    eager = plan.framework == "pytorch"
    full = tokens * h * e  # one [b, s, h] activation, bytes

    if model.is_mla:
        ops = [_norm("norm1", model, tok_sp, readers=1 if model.q_lora_rank else 2),
               *_mla_attention_ops(model, plan, tok_sp, dtype)]
    else:
        ops = [_norm("norm1", model, tok_sp, readers=3 if eager else 1),
               *_attention_ops(model, plan, tok_sp, dtype)]
    o_cols = heads * model.v_head_dim
    ops.append(Op("proj", "gemm", gemm=(tokens, h, o_cols), dtype=dtype, has_weight=True,
                  saved_bytes=tokens * o_cols * e, bias_grad_bytes=tokens * h * e if model.bias else 0.0))
    ops.append(_tp_comm("attn.reduce", full, plan, "reduce_scatter", gemm="proj"))
    ops.append(_residual("residual1", tok_sp * h, drop, eager))
    ops.append(_norm("norm2", model, tok_sp, readers=2 if (eager and model.mlp == "swiglu" and not moe) else 1))
    if moe:
        ops += _moe_ops(model, plan, tokens, full)
    else:
        ops += _mlp_ops(model, plan, tokens, model.ffn_hidden, full, "mlp", saved_input=tok_sp * h * e)
    ops.append(_residual("residual2", tok_sp * h, drop, eager))
    return _with_fp8_casts(ops, plan)


def _attention_ops(model: ModelSpec, plan: Plan, tok_sp: float, dtype: str) -> list[Op]:
    """Multi-head or grouped-query attention from the normed input to the core attention's
    output: the TP gather, the QKV projection(s), RoPE, context-parallel exchange, attention."""
    t, e = plan.tp, ACT_BYTES
    b, s = plan.micro_batch, plan.seq_len // plan.cp
    h, a, g, d = model.hidden, model.num_heads, model.num_kv_heads, model.head_dim
    tokens = b * s
    heads = a // t
    kv_heads = max(1, g // t)
    q_cols, kv_cols = heads * d, kv_heads * d
    drop = model.dropout
    eager = plan.framework == "pytorch"
    full = tokens * h * e
    ops: list[Op] = [_tp_comm("attn.allgather", full, plan, "all_gather", gemm="q" if eager else "qkv")]
    qkv_bias = (model.bias or model.qkv_bias)
    if eager:  # three projections sharing one saved input
        for i, (name, cols) in enumerate((("q", q_cols), ("k", kv_cols), ("v", kv_cols))):
            ops.append(Op(name, "gemm", gemm=(tokens, cols, h), dtype=dtype, has_weight=True,
                          saved_bytes=tok_sp * h * e if i == 0 else 0.0,
                          bias_grad_bytes=tokens * cols * e if qkv_bias else 0.0))
    else:  # with SP the GEMM input is kept sharded and all-gathered again for the weight gradient
        ops.append(Op("qkv", "gemm", gemm=(tokens, q_cols + 2 * kv_cols, h), dtype=dtype, has_weight=True,
                      saved_bytes=tok_sp * h * e,
                      bias_grad_bytes=tokens * (q_cols + 2 * kv_cols) * e if qkv_bias else 0.0))
        ops += _regather("qkv", full, plan)
    if model.position == "rope":
        rotated = tokens * (q_cols + kv_cols) * e
        if eager:  # x·cos + cat(−x2, x1)·sin on transposed views: five kernels, ten passes over x
            # q and k are each read twice (x·cos and the rotated half): their gradients are summed
            ops.append(Op("rope", "memory", bytes=10 * rotated, bwd_bytes_factor=1.0, sm_rate_Bps=EAGER_ROPE_SM_RATE,
                          bwd_extra_bytes=GRAD_SUM_BYTES / e * rotated, kernels=5))
        else:  # one fused kernel
            ops.append(Op("rope", "memory", bytes=2 * rotated, bwd_bytes_factor=1.0))
    ops += _cp_kv_exchange(plan, tokens * 2 * kv_cols * e)
    if plan.attention != "unfused":  # saves Q, K, V and the log-sum-exp (and its output: _keeps_output)
        ops.append(Op("attention", "attention", attention=(b, heads, kv_heads, d, s, s * plan.cp, True),
                      impl=plan.attention,
                      saved_bytes=tokens * (q_cols + 2 * kv_cols) * e + b * heads * s * 4
                      + (tokens * q_cols * e if _keeps_output(plan) else 0.0),
                      recompute_selective=True))
        if eager:
            ops.append(Op("attention.transpose", "memory", bytes=2 * tokens * q_cols * e, bwd_bytes_factor=1.0))
    else:  # Megatron 2021: batched QKᵀ, fused scale-mask-softmax, dropout, batched ·V
        scores = b * heads * s * s * plan.cp
        ops += [
            Op("scores", "gemm", gemm=(s, s * plan.cp, d), batch=b * heads, dtype="bf16",
               saved_bytes=2 * tokens * q_cols * e, recompute_selective=True),  # Q and K
        ]
        if eager:  # causal mask applied by masked_fill_ in place on a view of the scores
            ops.append(Op("attn.mask", "memory", bytes=2 * scores * e, recompute_selective=True, bwd_bytes_factor=1.0,
                          sm_rate_Bps=EAGER_MASKED_FILL_SM_RATE,
                          bwd_extra_bytes=(MASKED_FILL_VIEW_COPIES * 2 + 1) * scores * e))
        # a row reduction over the scores, like the norms (Megatron fuses scale and mask into it).
        # Its backward reads the gradient and the output and writes the gradient; eager PyTorch's
        # CUDA backward (softmax_backward_cuda_out) first forms grad·output in a kernel of its own
        # (read 2, write 1) that the reduction then reads in place of grad
        ops.append(Op("softmax", "norm", bytes=2 * scores * e, saved_bytes=scores * e, recompute_selective=True,
                      bwd_extra_bytes=SOFTMAX_GRAD_PRODUCT_BYTES * scores if eager else 0.0))
        if drop:  # backward reads the gradient and the mask and writes the gradient: the same 5 bytes
            ops.append(Op("attn.dropout", "memory", bytes=scores * (2 * e + 1), saved_bytes=scores * 1,
                          recompute_selective=True, bwd_bytes_factor=1.0))
        ops.append(Op("context", "gemm", gemm=(s, d, s * plan.cp), batch=b * heads, dtype="bf16",
                      saved_bytes=scores * e + tokens * q_cols * e, recompute_selective=True))  # probs and V
        # the batched product leaves [b·heads, s, d]; the output projection wants [s, b, heads·d]:
        # one contiguous copy (Megatron's permute(...).contiguous(), eager's transpose), and its
        # backward copies the gradient back
        ops.append(Op("context.permute", "memory", bytes=2 * tokens * q_cols * e, bwd_bytes_factor=1.0,
                      recompute_selective=True))
    return ops


def _mla_attention_ops(model: ModelSpec, plan: Plan, tok_sp: float, dtype: str) -> list[Op]:
    """Multi-head latent attention as Megatron-Core's ``MLASelfAttention`` runs it: the down
    projections to the query and key/value latents (and the shared rotary key) are ``duplicated``
    on every TP rank and see only its sequence-parallel share of the tokens; their latents are
    normed, all-gathered over TP and projected up per head (column-parallel: queries, keys'
    no-position part and values); RoPE is applied to the rotary parts, and the core attention runs
    QKᵀ (and in backward dQ, dK) at the query/key head width, ·V (dV, dP) at the value head width."""
    t, e = plan.tp, ACT_BYTES
    b, s = plan.micro_batch, plan.seq_len // plan.cp
    h, d, dv, rope = model.hidden, model.head_dim, model.v_head_dim, model.qk_rope_head_dim
    q_lora, kv_lora = model.q_lora_rank, model.kv_lora_rank
    tokens = b * s
    heads = model.num_heads // t
    ops: list[Op] = []
    if q_lora:
        ops += [Op("q_down", "gemm", gemm=(tok_sp, q_lora, h), dtype=dtype, has_weight=True, saved_bytes=tok_sp * h * e),
                Op("kv_down", "gemm", gemm=(tok_sp, kv_lora + rope, h), dtype=dtype, has_weight=True),
                _norm("q_norm", model, tok_sp, width=q_lora), _norm("kv_norm", model, tok_sp, width=kv_lora),
                _tp_comm("attn.latent_allgather", tokens * (q_lora + kv_lora + rope) * e, plan, "all_gather",
                         gemm="q_up"),
                Op("q_up", "gemm", gemm=(tokens, heads * d, q_lora), dtype=dtype, has_weight=True,
                   saved_bytes=tok_sp * q_lora * e)]
        ops += _regather("q_up", tokens * q_lora * e, plan)
    else:  # queries straight from the (gathered) hidden state, column-parallel
        ops += [Op("kv_down", "gemm", gemm=(tok_sp, kv_lora + rope, h), dtype=dtype, has_weight=True,
                   saved_bytes=tok_sp * h * e),
                _norm("kv_norm", model, tok_sp, width=kv_lora),
                _tp_comm("attn.allgather", tokens * (h + kv_lora + rope) * e, plan, "all_gather", gemm="q_proj"),
                Op("q_proj", "gemm", gemm=(tokens, heads * d, h), dtype=dtype, has_weight=True,
                   saved_bytes=tok_sp * h * e)]
        ops += _regather("q_proj", tokens * h * e, plan)
    ops.append(Op("kv_up", "gemm", gemm=(tokens, heads * (d - rope + dv), kv_lora), dtype=dtype, has_weight=True,
                  saved_bytes=tok_sp * kv_lora * e))
    ops += _regather("kv_up", tokens * kv_lora * e, plan)
    # one fused pass each (TE's fused MLA RoPE): read and write the queries; read the up-projected
    # keys and values and the rotary key, write whole keys and values per head
    rope_bytes = tokens * e * (2 * heads * d + heads * (d - rope + dv) + rope + heads * (d + dv))
    ops.append(Op("rope", "memory", bytes=rope_bytes, bwd_bytes_factor=1.0))
    ops += _cp_kv_exchange(plan, tokens * heads * (d + dv) * e)
    ops.append(Op("attention", "attention", attention=(b, heads, heads, d, s, s * plan.cp, True), v_head_dim=dv,
                  impl=plan.attention,
                  saved_bytes=tokens * heads * (2 * d + dv) * e + b * heads * s * 4
                  + (tokens * heads * dv * e if _keeps_output(plan) else 0.0),
                  recompute_selective=True))
    return ops


def _cp_kv_exchange(plan: Plan, kv_bytes: float) -> list[Op]:
    """Context parallelism's exchange of a rank's K and V (``kv_bytes`` for its tokens)."""
    if plan.cp == 1:
        return []
    if plan.cp_comm == "allgather":  # gather K and V of the whole sequence (Llama 3)
        return [Op("cp.kv_allgather", "collective", collective="all_gather", group="cp",
                   comm_bytes=kv_bytes * plan.cp)]
    # ring attention: the local K and V block visits every other rank of the ring, overlapped
    # with attention on the block in hand; backward sends dK and dV along too
    return [Op("cp.kv_ring", "collective", collective="ring_exchange", group="cp", comm_bytes=kv_bytes,
               bwd_bytes_factor=2.0, hidden_by="attention")]


def _keeps_output(plan: Plan) -> bool:
    """Whether the fused attention's output, which its backward reads, is saved apart from the
    output projection's saved input, which it otherwise is: eager code keeps a contiguous
    transpose, Transformer Engine's fp8 an fp8 copy (``_with_fp8_casts``)."""
    return plan.framework == "pytorch" or gemm_dtype(plan) == "fp8"


def _mlp_ops(model: ModelSpec, plan: Plan, tokens: float, width: int, full: float, prefix: str,
             tp_comms: bool = True, saved_input: float | None = None, shards: int | None = None) -> list[Op]:
    """An MLP of ``width`` on ``tokens``, its weights split over ``shards`` ranks (tp by default)."""
    e, h = ACT_BYTES, model.hidden
    f = width / (plan.tp if shards is None else shards)
    dtype = gemm_dtype(plan)
    up_cols = f * (2 if model.mlp == "swiglu" else 1)
    ops = []
    eager_swiglu = model.mlp == "swiglu" and plan.framework == "pytorch"
    if tp_comms:
        ops.append(_tp_comm(f"{prefix}.allgather", full, plan, "all_gather",
                            gemm=f"{prefix}.gate" if eager_swiglu else f"{prefix}.up"))
    saved_in = tokens * h * e if saved_input is None else saved_input
    if eager_swiglu:
        # gate and up projections apart; silu(gate) then ·up: saves gate, silu(gate) and up
        ops += [Op(f"{prefix}.gate", "gemm", gemm=(int(tokens), int(f), h), dtype=dtype, has_weight=True,
                   saved_bytes=saved_in),
                Op(f"{prefix}.up", "gemm", gemm=(int(tokens), int(f), h), dtype=dtype, has_weight=True),
                Op(f"{prefix}.silu", "memory", bytes=2 * tokens * f * e, saved_bytes=tokens * f * e),
                Op(f"{prefix}.mul", "memory", bytes=3 * tokens * f * e, saved_bytes=2 * tokens * f * e,
                   bwd_bytes_factor=2.0)]
    else:
        ops.append(Op(f"{prefix}.up", "gemm", gemm=(int(tokens), int(up_cols), h), dtype=dtype, has_weight=True,
                      saved_bytes=saved_in, bias_grad_bytes=tokens * up_cols * e if model.bias else 0.0))
        if tp_comms:
            ops += _regather(f"{prefix}.up", full, plan)
    if model.mlp == "swiglu" and plan.framework != "pytorch":  # fused: reads gate and up, saves both
        ops.append(Op(f"{prefix}.swiglu", "memory", bytes=3 * tokens * f * e, saved_bytes=2 * tokens * f * e,
                      bwd_bytes_factor=5 / 3))
    elif model.mlp == "gelu":  # fused bias-GeLU: saves its input (4h wide)
        ops.append(Op(f"{prefix}.gelu", "memory", bytes=(2 * tokens * f + (f if model.bias else 0)) * e,
                      saved_bytes=tokens * f * e))
    ops.append(Op(f"{prefix}.down", "gemm", gemm=(int(tokens), h, int(f)), dtype=dtype, has_weight=True,
                  saved_bytes=tokens * f * e, bias_grad_bytes=tokens * h * e if model.bias else 0.0))
    if tp_comms:
        ops.append(_tp_comm(f"{prefix}.reduce", full, plan, "reduce_scatter", gemm=f"{prefix}.down"))
    return ops


def _moe_ops(model: ModelSpec, plan: Plan, tokens: float, full: float) -> list[Op]:
    """Router, all-to-all dispatch over the EP group, local experts, all-to-all combine.

    Tokens are assumed balanced over experts: each rank processes tokens·top_k expert-tokens.
    Under ``Plan.moe_dispatcher`` "alltoall" the all-to-alls come with Megatron-Core's dropless
    dispatcher's copies (``MoEAlltoAllTokenDispatcher``): token copies gathered into expert order
    before the dispatch (permutation 1), and, where a rank holds several experts and receives
    from several ranks, the received rows regrouped by local expert and back
    (``sort_chunks_by_idxs``, permutation 2), each reading and writing every routed row (fused
    kernels or not), then the top-k outputs weighted and summed back per token (unpermute).
    Under "fused" (DeepEP, HybridEP) the dispatch and combine kernels do all of that as they send.
    With experts split like the dense MLP (etp = tp) the TP group first gathers the sequence-
    parallel tokens and reduce-scatters after; with Megatron-Core's parallel folding (etp 1, tp > 1)
    each TP rank routes its own 1/tp of them to whole experts, and a shared expert keeps the
    dense MLP's TP collectives.
    """
    e, h, k = ACT_BYTES, model.hidden, model.top_k
    folded = plan.expert_tp < plan.tp
    if folded:
        tokens = tokens / plan.tp
    routed = tokens * k
    copies = plan.moe_dispatcher == "alltoall"
    regroup = copies and plan.ep > 1 and model.num_experts // plan.ep > 1
    ops = [] if folded else [_tp_comm("moe.allgather", full, plan, "all_gather")]
    ops += [
        Op("router", "gemm", gemm=(int(tokens), model.num_experts, h), dtype="bf16",
           has_weight=True, saved_bytes=0.0),
        Op("router.topk", "memory", bytes=tokens * model.num_experts * 4 * 2),
    ]
    if copies:
        ops.append(Op("moe.permute", "memory", bytes=2 * routed * h * e, bwd_bytes_factor=1.0))
    ops.append(Op("moe.dispatch", "collective", collective="all_to_all" if plan.ep > 1 else "none", group="ep",
                  comm_bytes=routed * h * e))
    if regroup:
        ops.append(Op("moe.sort_chunks", "memory", bytes=2 * routed * h * e, bwd_bytes_factor=1.0))
    ops += _mlp_ops(model, plan, routed, model.moe_ffn_hidden, full, "experts", tp_comms=False,
                    shards=plan.expert_tp)
    if model.shared_experts:
        # folded: the shared expert is a dense TP MLP on the gathered sequence
        ops += _mlp_ops(model, plan, tokens * plan.tp if folded else tokens,
                        model.moe_ffn_hidden * model.shared_experts, full, "shared", tp_comms=folded)
    if regroup:
        ops.append(Op("moe.unsort_chunks", "memory", bytes=2 * routed * h * e, bwd_bytes_factor=1.0))
    ops.append(Op("moe.combine", "collective", collective="all_to_all" if plan.ep > 1 else "none", group="ep",
                  comm_bytes=routed * h * e))
    if copies:  # the weighting by the router's probabilities keeps the expert outputs for its backward
        ops.append(Op("moe.unpermute", "memory", bytes=3 * routed * h * e, saved_bytes=routed * h * e))
    if not folded:
        ops.append(_tp_comm("moe.reduce", full, plan, "reduce_scatter"))
    return ops


def embedding_ops(model: ModelSpec, plan: Plan) -> list[Op]:
    """Vocabulary-parallel embedding lookup (+ learned positions), then the TP reduction."""
    e, h = ACT_BYTES, model.hidden
    tokens = plan.micro_batch * (plan.seq_len // plan.cp)
    ops = [Op("embedding", "memory", bytes=2 * tokens * h * e, bwd_bytes_factor=2.0)]
    if model.position == "learned":
        ops.append(Op("embedding.positions", "memory", bytes=3 * tokens * h * e, bwd_bytes_factor=1.0))
    if model.dropout:
        ops.append(Op("embedding.dropout", "memory", bytes=tokens * h * (2 * e + 1),
                      saved_bytes=tokens * h / (plan.tp if plan.sequence_parallel and plan.tp > 1 else 1)))
    ops.append(_tp_comm("embedding.reduce", tokens * h * e, plan, "reduce_scatter"))
    return ops


class LossBytes(NamedTuple):
    """Bytes of the cross-entropy per logit (per token where named): HBM traffic forward and
    backward, what it keeps for backward, and the working memory live while it runs forward and
    backward (the engine's transient, beside the rest of the head)."""

    forward: float
    backward: float
    kept: float
    kept_per_token: float
    working_f: float
    working_b: float


#: The unfused loss on fp32 logits.  Megatron-LM's ``vocab_parallel_cross_entropy``
#: (mpu/cross_entropy.py, 2021; tensor_parallel/cross_entropy.py in Megatron-Core without
#: --cross-entropy-loss-fusion) runs one kernel per step on the fp32 logits: the upcast (read 2,
#: write 4), max (read 4), subtract (read 4, write 4), exp (read 4, write 4), sum (read 4), divide
#: into the softmax it keeps (read 4, write 4): 38; backward multiplies the softmax by the loss
#: gradient in place (read 4, write 4) and casts it back (read 4, write 2): 14.  Eager PyTorch:
#: upcast and log_softmax (read 4, write 4) forward; nll_loss backward, log_softmax backward and
#: the cast apart (22) backward.  Both keep an fp32 softmax (4); working memory: the bf16 logits,
#: their fp32 copy and the fp32 softmax forward (2 + 4 + 4), the softmax, its gradient and the bf16
#: gradient backward (4 + 4 + 2).
_UNFUSED_LOSS = {"megatron": LossBytes(38.0, 14.0, 4.0, 0.0, ACT_BYTES + 4 + 4, 4 + 4 + ACT_BYTES),
                 "pytorch": LossBytes(14.0, 22.0, 4.0, 0.0, ACT_BYTES + 4 + 4, 4 + 4 + ACT_BYTES)}
#: The fused kernel (``Plan.cross_entropy = "fused"``, flash-attn's xentropy: forward
#: ``xentropy_cuda_lib.forward(logits, labels)`` saves the logits, an fp32 log-sum-exp per row and the
#: labels; backward writes a new gradient the logits' dtype) reads the 16-bit logits once forward
#: and once backward, and writes their gradient: 2 and 4 bytes per logit, the logits (2) and the
#: log-sum-exp (4 per token) kept; it holds the logits forward and adds their gradient backward.
_FUSED_LOSS = LossBytes(2.0, 4.0, ACT_BYTES, 4.0, ACT_BYTES, 2 * ACT_BYTES)


def loss_bytes(plan: Plan) -> LossBytes:
    """The cross-entropy's bytes under ``plan`` (``Plan.cross_entropy``, and the framework's
    unfused loss)."""
    return _FUSED_LOSS if plan.cross_entropy == "fused" else _UNFUSED_LOSS[plan.framework]


#: Megatron pads the vocabulary to a multiple of this × tp (``--make-vocab-size-divisible-by``,
#: default 128; ``_vocab_size_with_padding``), which keeps the logits GEMM's N 16-byte aligned
#: (GPT-2's 50,257 is not: cuBLAS would fall back to its slow kernels)
MEGATRON_VOCAB_MULTIPLE = 128


def pipeline_message(model: ModelSpec, plan: Plan) -> tuple[float, float]:
    """Bytes of one pipeline send per rank (activations forward, their gradient backward), and the
    bytes the receiving stage's TP group then all-gathers to rebuild the full tensor (0: none).

    Under sequence parallelism each TP rank already holds its share of the [s, b, h] tensor and
    sends it.  Without it every TP rank needs the whole tensor: Megatron-Core sends it whole from
    every rank (``p2p_communication``: the sequence is divided by tp only with SP); Megatron-LM
    2021 (``overlap_p2p`` False) sent one 1/tp piece per rank and all-gathered the pieces over the
    TP group on receipt (``--scatter-gather-tensors-in-pipeline``, on by default:
    ``mpu.gather_split_1d_tensor``)."""
    full = plan.micro_batch * plan.seq_len // plan.cp * model.hidden * ACT_BYTES
    if plan.tp == 1 or plan.sequence_parallel:
        return full / plan.tp, 0.0
    if not plan.overlap_p2p:
        return full / plan.tp, full
    return full, 0.0


def local_vocab(model: ModelSpec, plan: Plan) -> int:
    """Vocabulary rows one TP rank's output layer holds: Megatron's padded vocabulary over tp;
    eager PyTorch (Hugging Face, torchtitan) pads nothing."""
    if plan.framework == "megatron":
        multiple = MEGATRON_VOCAB_MULTIPLE * plan.tp
        return math.ceil(model.vocab / multiple) * multiple // plan.tp
    return math.ceil(model.vocab / plan.tp)


def head_ops(model: ModelSpec, plan: Plan) -> list[Op]:
    """Final norm, vocabulary-parallel logits GEMM and the cross-entropy: by default on fp32
    logits (Megatron's ``vocab_parallel_cross_entropy``: logits upcast to fp32, a softmax's worth
    of passes), or one fused kernel on the 16-bit logits (``Plan.cross_entropy``)."""
    t, e, h = plan.tp, ACT_BYTES, model.hidden
    tokens = plan.micro_batch * (plan.seq_len // plan.cp)
    sp = plan.tp > 1 and plan.sequence_parallel
    tok_sp = tokens / t if sp else tokens
    vocab_local = local_vocab(model, plan)
    logits = tokens * vocab_local
    loss = loss_bytes(plan)
    return [
        _norm("final_norm", model, tok_sp),
        _tp_comm("head.allgather", tokens * h * e, plan, "all_gather"),
        Op("logits", "gemm", gemm=(tokens, vocab_local, h), dtype="bf16", has_weight=True,
           saved_bytes=tokens * h * e),
        Op("cross_entropy", "memory", bytes=logits * loss.forward, bwd_bytes_factor=loss.backward / loss.forward,
           saved_bytes=logits * loss.kept + tokens * loss.kept_per_token),
    ]


def split_layers(num_layers: int, stages: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Layers per (virtual) stage.  Even where possible; otherwise the remainder is taken off the
    first and last stages, which also hold the embedding and the loss (DESIGN.md, Uneven
    pipelines; Llama 3 405B: 126 layers on 16 stages as 7 + 14·8 + 7)."""
    if first is not None or last is not None:
        if stages == 1:
            raise PlanError("first_stage_layers/last_stage_layers: need more than one pipeline stage (pp > 1)")
        for name, value in (("first_stage_layers", first), ("last_stage_layers", last)):
            if value is not None and not 1 <= value <= num_layers - (stages - 1):
                raise PlanError(f"{name}: {value} must be between 1 and {num_layers - (stages - 1)} (num_layers "
                                f"{num_layers} over {stages} stages, each with at least one layer)")
        middle_stages = stages - 2
        rest = num_layers - (first or 0) - (last or 0)
        if first is None or last is None:
            known = first if first is not None else last
            rest = num_layers - known
            per = rest / (stages - 1)
            if per != int(per):
                raise PlanError(f"first_stage_layers/last_stage_layers: the other {stages - 1} stages cannot share "
                                f"{rest} layers evenly")
            per = int(per)
            return [first if first is not None else per] + [per] * middle_stages + [last if last is not None else per]
        if middle_stages == 0:
            if rest:
                raise PlanError(f"first_stage_layers + last_stage_layers must equal num_layers {num_layers}")
            return [first, last]
        if rest < middle_stages or rest % middle_stages:
            raise PlanError(f"first_stage_layers/last_stage_layers: {rest} layers do not split over "
                            f"{middle_stages} middle stages")
        return [first] + [rest // middle_stages] * middle_stages + [last]
    if stages == 1:
        return [num_layers]
    per = math.ceil(num_layers / stages)
    deficit = per * stages - num_layers
    counts = [per] * stages
    counts[0] -= math.ceil(deficit / 2)
    counts[-1] -= deficit // 2
    if min(counts) < 1:
        raise PlanError(f"pp: {num_layers} layers cannot fill {stages} pipeline stages")
    return counts


@dataclass(frozen=True)
class Chunk:
    """One virtual pipeline stage: a contiguous run of layers placed on rank ``rank``."""

    index: int  # virtual stage index, 0 .. pp·vpp - 1
    rank: int  # pipeline rank holding it
    first_layer: int
    num_layers: int
    has_embedding: bool
    has_head: bool


@dataclass
class TrainingWorkload:
    """The op graph of one iteration: per-layer op lists (shared by identical layers) and the
    pipeline chunking; built once per (model, plan) and costed by the simulator."""

    model: ModelSpec
    plan: Plan
    chunks: list[Chunk] = field(init=False)

    def __post_init__(self) -> None:
        model, plan = self.model, self.plan
        check_plan_fits_model(model, plan)
        stages = plan.pp * plan.vpp
        counts = split_layers(model.num_layers, stages, plan.first_stage_layers, plan.last_stage_layers)
        chunks, start = [], 0
        for vs, n in enumerate(counts):
            chunks.append(Chunk(vs, vs % plan.pp, start, n, vs == 0, vs == stages - 1))
            start += n
        self.chunks = chunks

    @cached_property
    def dense_layer(self) -> list[Op]:
        return layer_forward_ops(self.model, self.plan, moe=False)

    @cached_property
    def moe_layer(self) -> list[Op]:
        return layer_forward_ops(self.model, self.plan, moe=True) if self.model.is_moe else []

    @cached_property
    def embedding(self) -> list[Op]:
        return embedding_ops(self.model, self.plan)

    @cached_property
    def head(self) -> list[Op]:
        return head_ops(self.model, self.plan)

    def layer_ops(self, layer: int) -> list[Op]:
        return self.moe_layer if self.model.is_moe_layer(layer) else self.dense_layer

    @property
    def accumulate_bytes_per_weight(self) -> float:
        """HBM bytes per weight element per micro-batch spent adding its gradient into the
        accumulated one, when the weight-gradient GEMM does not accumulate in place.

        fp32 ``main_grad`` (Megatron's local DDP before gradient-accumulation fusion): read the
        16-bit gradient and the fp32 sum, write the sum: 2 + 4 + 4.  16-bit ``param.grad``
        (PyTorch autograd): 2 + 2 + 2, and only from the second micro-batch on.
        """
        plan = self.plan
        if plan.grad_accumulation_fusion:
            return 0.0
        if plan.fp32_grads:
            return 10.0
        m = plan.num_microbatches
        return 6.0 * (m - 1) / m

    def layer_recompute(self, chunk: Chunk, layer: int) -> str:
        """The recomputation policy of ``layer`` in ``chunk``: the plan's where it picks the layer
        (``Plan.layer_recomputed``: every layer, or Megatron's first N, or torchtitan's every N-th),
        none elsewhere."""
        return self.plan.recompute if self.plan.layer_recomputed(chunk.first_layer, layer) else "none"

    def phases(self, forward: list[Op], policy: str | None = None) -> dict[str, list[Op]]:
        """F, R (recomputation), B and W op lists for a forward list under ``policy`` (the plan's
        recomputation by default)."""
        b_ops, w_ops = backward_ops(forward, self.accumulate_bytes_per_weight)
        # activation checkpointing wraps the transformer layers only (Megatron's full and
        # selective recomputation): the embedding and the output layer + loss are not re-run
        is_layer = forward is not self.embedding and forward is not self.head
        policy = (self.plan.recompute if policy is None else policy) if is_layer else "none"
        early_stop = self.plan.framework == "pytorch"  # torch.utils.checkpoint(use_reentrant=False)
        return {"F": forward, "R": recompute_ops(forward, policy, early_stop), "B": b_ops, "W": w_ops}

    # --- memory ----------------------------------------------------------------------------
    def saved_activation_bytes(self, forward: list[Op], policy: str | None = None) -> float:
        """Bytes a layer (or embedding/head) keeps per micro-batch until its backward, under
        ``policy`` (the plan's recomputation by default)."""
        policy = self.plan.recompute if policy is None else policy
        if policy in ("full", "selective-op"):
            tokens = self.plan.micro_batch * self.plan.seq_len // self.plan.cp
            sp = self.plan.tp if (self.plan.tp > 1 and self.plan.sequence_parallel) else 1
            layer_input = tokens * self.model.hidden * ACT_BYTES / sp
            if policy == "full":
                return layer_input  # the layer input only
            kept = op_sac_saved(forward)  # and the outputs the op-level policy keeps
            return layer_input + sum(self._output_bytes(op) for op in forward if op.name in kept)
        dropped = {op.name for op in forward if op.recompute_selective} if policy == "selective" else set()
        kept = sum(op.saved_bytes for op in forward if op.name not in dropped)
        if policy == "selective" and self.plan.attention == "unfused":
            # the recomputation needs Q, K, V again: they stay (Korthikanti §5: only the 5as/h term goes)
            tokens = self.plan.micro_batch * self.plan.seq_len // self.plan.cp
            kept += 3 * tokens * self.model.hidden * ACT_BYTES / self.plan.tp
        return kept

    def _output_bytes(self, op: Op) -> float:
        """Bytes of what a GEMM, the fused attention or a reduce-scatter returns (16-bit
        activations; attention adds its fp32 log-sum-exp per query row and head)."""
        if op.gemm is not None:
            m, n, _ = op.gemm
            return m * n * op.batch * ACT_BYTES
        if op.attention is not None:
            b, heads, _, d, s, _, _ = op.attention
            return b * heads * s * ((op.v_head_dim or d) * ACT_BYTES + 4)
        if op.collective == "reduce_scatter":
            return op.comm_bytes / self.plan.tp
        return 0.0

    def chunk_params(self, chunk: Chunk) -> tuple[float, float]:
        """(dense, expert) parameters a rank holds for ``chunk`` (TP-sharded; experts over EP too)."""
        m, t = self.model, self.plan.tp
        dense = expert = 0.0
        whole = m.replicated_attention_params  # MLA's down projections: a copy on every TP rank
        attention = (m.attention_params - whole) / t + whole
        for layer in range(chunk.first_layer, chunk.first_layer + chunk.num_layers):
            if m.is_moe_layer(layer):
                routed = m.num_experts * m.expert_params
                expert += routed / (self.plan.expert_tp * self.plan.ep)
                dense += attention + (m.moe_mlp_params - routed) / t + m.norm_params
            else:
                dense += attention + m.dense_mlp_params / t + m.norm_params
        if chunk.has_embedding:
            dense += m.embedding_params / t
        if chunk.has_head:
            # a tied output layer is the embedding's own tensor where both sit in one chunk; on another
            # pipeline stage it is a copy (Megatron keeps one there and all-reduces its gradient)
            head = m.lm_head_params if not m.tied_embeddings else 0 if chunk.has_embedding else m.vocab * m.hidden
            dense += head / t + m.final_norm_params
        return dense, expert


def check_plan_fits_model(model: ModelSpec, plan: Plan) -> None:
    """Divisibility rules between a model and a plan (errors name field, value, allowed)."""
    if model.num_heads % plan.tp:
        raise PlanError(f"tp: {plan.tp} must divide the number of attention heads {model.num_heads}")
    if model.num_kv_heads % plan.tp and plan.tp % model.num_kv_heads:
        raise PlanError(f"tp: {plan.tp} and the key/value heads {model.num_kv_heads} must divide one another")
    if plan.expert_tp != plan.tp and not model.is_moe:
        raise PlanError(f"etp: {plan.etp} applies to mixture-of-experts models; {model.name} is dense")
    if plan.ep > 1 and not model.is_moe:
        raise PlanError(f"ep: {plan.ep} needs a mixture-of-experts model; {model.name} is dense (ep must be 1)")
    if plan.ep > 1 and model.num_experts % plan.ep:
        raise PlanError(f"ep: {plan.ep} must divide the number of experts {model.num_experts}")
    if model.is_mla and plan.attention == "unfused":
        raise PlanError("attention: unfused is not modelled for multi-head latent attention; allowed: flash, cudnn")
    if model.position == "learned" and plan.seq_len > model.max_seq_len:
        raise PlanError(f"seq_len: {plan.seq_len} exceeds the {model.max_seq_len} learned positions of {model.name}")
    if plan.pp * plan.vpp > model.num_layers:
        raise PlanError(f"pp: pp·vpp = {plan.pp * plan.vpp} exceeds the {model.num_layers} layers")
    if plan.sequence_parallel and plan.tp > 1 and (plan.micro_batch * plan.seq_len // plan.cp) % plan.tp:
        raise PlanError(f"tp: {plan.tp} must divide the tokens per micro-batch for sequence parallelism")
