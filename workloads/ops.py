"""Operators of a training iteration: what runs, with its shape, FLOPs, bytes and saved tensors.

An ``Op`` knows nothing of hardware: the simulator's cost models turn it into seconds.  The
graph is a list per layer in execution order (forward), from which backward and recomputation
ops are derived by rule, so that every forward op has exactly its backward counterpart.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

KINDS = ("gemm", "attention", "memory", "norm", "collective")
PHASES = ("F", "B", "W", "R", "O")  # forward, input-grad, weight-grad, recompute, optimizer

#: the collective that carries gradients back through a forward collective
CONJUGATE = {"all_gather": "reduce_scatter", "reduce_scatter": "all_gather", "all_reduce": "all_reduce",
             "ring_exchange": "ring_exchange",
             "all_to_all": "all_to_all", "none": "none"}


#: HBM passes of a normalisation kernel over its [tokens, hidden] input: forward reads the
#: input and writes the output; backward reads the input and the output gradient and writes
#: the input gradient (the weight-gradient reduction is small).  Norm kernels reduce over each
#: row before they can write it, so they stream below a plain elementwise op's bandwidth: the
#: device's ``norm_bandwidth_fraction`` (simulator/costs/compute.py) says by how much.
NORM_PASSES = 2.0
NORM_BACKWARD_PASSES = 3.0
_DTYPE_BYTES = {"fp8": 1, "bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4}


def norm_bytes(tokens, hidden, dtype: str = "bf16"):
    """HBM bytes of one forward RMSNorm or LayerNorm over ``tokens`` rows of ``hidden``."""
    return NORM_PASSES * tokens * hidden * _DTYPE_BYTES[dtype]


@dataclass(frozen=True, slots=True)
class Op:
    """One kernel or collective of one rank.

    ``gemm`` is (m, n, k) with ``batch`` independent products; ``attention`` is
    (batch, heads, kv_heads, head_dim, seq_q, seq_kv, causal).  ``bytes`` is the HBM traffic
    of a memory-bound op; ``comm_bytes`` a collective's buffer size as nccl-tests counts it.
    ``saved_bytes`` is what the forward op keeps for backward; ``bwd_bytes_factor`` scales a
    memory op's traffic for its backward (reads input and output-grad, writes input-grad).
    """

    name: str
    kind: str
    phase: str = "F"
    gemm: tuple[int, int, int] | None = None
    batch: int = 1
    attention: tuple[int, int, int, int, int, int, bool] | None = None
    bytes: float = 0.0
    dtype: str = "bf16"
    saved_bytes: float = 0.0
    collective: str = "none"
    group: str = ""
    comm_bytes: float = 0.0
    has_weight: bool = False  # gemm with a trainable weight: backward has a weight-grad part
    bias_grad_bytes: float = 0.0  # gemm with a bias: its gradient is a reduction over dY's rows
    bwd_bytes_factor: float = 1.5  # memory ops: backward traffic / forward; collectives: backward bytes / forward
    hidden_by: str = ""  # a collective that overlaps this compute op (by forward name): only the excess shows
    bwd_collective: str = ""  # the collective its backward runs ("": the CONJUGATE of ``collective``)
    bwd_hidden_by: str = ""  # the compute op (by its backward name) that its backward collective runs beside
    sm_rate_Bps: float = 0.0  # memory ops whose kernels are bound by the SMs, not HBM: bytes/s per SM (0: HBM-bound)
    bwd_extra_bytes: float = 0.0  # backward: HBM traffic of the elementwise kernels autograd adds around
    #   this op: sums of the gradients of tensors that several ops use (a residual stream, a norm
    #   output feeding q, k and v), the clones and copy-back of an in-place op on a view (CopySlices),
    #   the grad·output product eager softmax's backward forms before its reduction
    recompute_selective: bool = False  # recomputed under selective recomputation
    kernels: int = 1  # kernels (or NCCL calls) the host issues for it; its backward issues as many
    impl: str = "flash"  # attention: the fused kernels that run it (workloads.plan.FUSED_ATTENTION)
    v_head_dim: int = 0  # attention: the value heads' width where it is not the query/key heads' (MLA); 0: the same

    @property
    def flops(self) -> float:
        """Executed FLOPs (attention: see simulator.costs.compute.attention_flops)."""
        if self.gemm is not None:
            m, n, k = self.gemm
            return 2.0 * m * n * k * self.batch
        return 0.0


def backward_ops(forward: list[Op], accumulate_bytes_per_weight: float = 0.0) -> tuple[list[Op], list[Op]]:
    """Input-gradient (B) and weight-gradient (W) ops for a forward op list, in reverse order.

    GEMM Y[m,n] = X[m,k]·W[k,n]: dX = dY·Wᵀ is (m, k, n); dW = Xᵀ·dY is (k, n, m), only for
    trainable weights (2× forward FLOPs in all), plus a bias gradient (a row reduction of dY)
    where the layer has a bias; the forward bias add is fused into the GEMM or the next kernel.
    ``accumulate_bytes_per_weight`` > 0 adds the separate kernel that adds each micro-batch's
    weight gradient into the accumulated one (unfused gradient accumulation).  Attention backward
    is its own kernel; memory ops move ``bwd_bytes_factor`` times their forward bytes;
    collectives become their conjugate, or the ``bwd_collective`` they name (Megatron's f and g
    operators), and run beside ``bwd_hidden_by`` where they name it.  ``bwd_extra_bytes`` adds the
    elementwise kernels autograd runs around the op (gradient sums, CopySlices' copies).
    """
    b_ops: list[Op] = []
    w_ops: list[Op] = []
    for op in reversed(forward):
        if op.bwd_extra_bytes:
            b_ops.append(Op(f"{op.name}.autograd", "memory", phase="B", bytes=op.bwd_extra_bytes))
        if op.kind == "gemm":
            m, n, k = op.gemm
            b_ops.append(replace(op, name=f"{op.name}.dgrad", phase="B", gemm=(m, k, n), saved_bytes=0.0))
            if op.has_weight:
                w_ops.append(replace(op, name=f"{op.name}.wgrad", phase="W", gemm=(k, n, m), saved_bytes=0.0))
                if accumulate_bytes_per_weight:
                    w_ops.append(Op(f"{op.name}.grad_accumulate", "memory", phase="W",
                                    bytes=k * n * accumulate_bytes_per_weight))
            else:  # both operands are activations (unfused attention's batched products)
                b_ops.append(replace(op, name=f"{op.name}.dgrad2", phase="B", gemm=(k, n, m), saved_bytes=0.0))
            if op.bias_grad_bytes:
                w_ops.append(Op(f"{op.name}.bias_grad", "memory", phase="W", bytes=op.bias_grad_bytes))
        elif op.kind == "attention":
            b_ops.append(replace(op, name=f"{op.name}.bwd", phase="B", saved_bytes=0.0))
        elif op.kind in ("memory", "norm"):
            b_ops.append(replace(op, name=f"{op.name}.bwd", phase="B", bytes=op.bytes * op.bwd_bytes_factor,
                                 saved_bytes=0.0, bwd_extra_bytes=0.0))
        elif op.kind == "collective":
            collective = op.bwd_collective or CONJUGATE[op.collective]
            if collective == "none":
                continue
            bytes_back = op.comm_bytes * (op.bwd_bytes_factor if op.collective == "ring_exchange" else 1.0)
            b_ops.append(replace(op, name=f"{op.name}.bwd", phase="B", collective=collective,
                                 comm_bytes=bytes_back, saved_bytes=0.0, hidden_by=op.bwd_hidden_by or op.hidden_by))
    return b_ops, w_ops


def op_sac_saved(forward: list[Op]) -> set[str]:
    """The forward ops whose outputs torchtitan's op-level selective AC keeps (``selective-op``).

    Its policy (torchtitan ``parallelize_llama``, Dec. 2024; ``distributed/activation_checkpoint``
    today) saves the outputs of ``aten.mm``, of the fused SDPA kernels and of TP reduce-scatters,
    except every second ``mm`` of the block (the count starts afresh at each checkpointed call):
    in a Llama block q, v, gate and down are kept, k, the output projection and up re-run.
    Everything else (norms, RoPE, SiLU·mul, residual adds, other collectives) is recomputed."""
    saved, mms = set(), 0
    for op in forward:
        if op.kind == "gemm" and op.has_weight:
            mms += 1
            if mms % 2:
                saved.add(op.name)
        elif op.kind == "attention" or op.collective == "reduce_scatter":
            saved.add(op.name)
    return saved


def recompute_ops(forward: list[Op], policy: str, early_stop: bool = False) -> list[Op]:
    """Forward ops re-run before backward: all of them (full), the attention core (selective),
    or what torchtitan's op-level policy does not keep (selective-op, ``op_sac_saved``).

    ``early_stop``: PyTorch's non-reentrant ``torch.utils.checkpoint`` stops recomputing "as soon
    as it has computed all needed Tensors" (its default; ``set_checkpoint_early_stop``), so the
    ops after the last one whose output backward keeps are not re-run: in a Llama block the down
    projection (it keeps its input, not its output), its TP reduction and the residual add.
    A GEMM keeps its input, so the last GEMM that keeps something is itself not re-run; any other
    op that keeps something is (dropout keeps its own mask).  Megatron's checkpoint re-runs the
    whole layer."""
    if policy in ("full", "selective-op"):
        chosen = forward
        if early_stop and forward:
            last = max((i for i, op in enumerate(forward) if op.saved_bytes > 0), default=len(forward) - 1)
            chosen = forward[:last] if forward[last].kind == "gemm" else forward[:last + 1]
        if policy == "selective-op":
            kept = op_sac_saved(forward)
            chosen = [op for op in chosen if op.name not in kept]
    elif policy == "selective":
        chosen = [op for op in forward if op.recompute_selective]
    else:
        chosen = []
    return [replace(op, name=f"{op.name}.recompute", phase="R", saved_bytes=0.0) for op in chosen]
