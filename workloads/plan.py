"""The training ``Plan``: how a model is laid out on a cluster.  An input, like the model.

Frozen and validated on construction (torchtitan's ``ParallelDims`` style): every error names
the field, the value and what is allowed.  Degrees follow Megatron-LM: world = tp·pp·dp·cp,
and expert parallelism is carved out of dp·cp.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

RECOMPUTE = ("none", "selective", "full", "selective-op")  # selective: Megatron's (the attention core);
#   selective-op: torchtitan's op-level selective AC (GEMM and attention outputs kept, every second GEMM
#   and all else re-run; framework "pytorch" only)
SCHEDULES = ("1f1b", "interleaved", "gpipe", "zero-bubble")
PRECISIONS = ("bf16-mixed", "fp16-mixed", "bf16-pure", "fp8")  # fp16-mixed: bf16-mixed storage with dynamic
#   loss scaling (Megatron-LM's --fp16), whose optimizer step also unscales and checks the gradients
FUSED_ATTENTION = ("flash", "cudnn")  # the fused kernels: FlashAttention-2 (PyTorch SDPA), cuDNN's (Transformer Engine)
ATTENTION = (*FUSED_ATTENTION, "unfused")
FRAMEWORKS = ("megatron", "pytorch")
DDP_IMPLS = ("megatron", "torch")
CP_COMMS = ("ring", "allgather")
CROSS_ENTROPY = ("unfused", "fused")  # unfused: the framework's own loss on fp32 logits; fused: one kernel on the
#   16-bit logits (flash-attn's xentropy, llm-foundry's default fused_crossentropy)
MOE_DISPATCHERS = ("alltoall", "fused")  # alltoall: NCCL all-to-all with the token permutations as copies of their
#   own (Megatron-Core's alltoall dispatcher); fused: DeepEP / HybridEP kernels that permute and combine as they send
TIERS = ("gpu", "cpu", "nvme", "cxl")
OFFLOADABLE = ("params", "grads", "optimizer", "activations")


class PlanError(ValueError):
    """A plan that is malformed (not merely infeasible on some hardware)."""


INTEGER_FIELDS = ("tp", "pp", "dp", "cp", "ep", "micro_batch", "global_batch", "seq_len", "vpp")
BOOLEAN_FIELDS = ("sequence_parallel", "overlap_grad_reduce", "overlap_p2p", "grad_accumulation_fusion",
                  "fp32_grads", "tp_backward_overlap", "tp_comm_overlap", "moe_a2a_overlap")
#: the switches whose None means "the default for the other fields" (set in ``__post_init__``)
DEFAULTED_SWITCHES = ("sequence_parallel", "grad_accumulation_fusion", "tp_backward_overlap")
#: what each framework's fused attention runs by default (Plan.attention None)
DEFAULT_ATTENTION = {"megatron": "cudnn", "pytorch": "flash"}


def check_positive_int(name: str, value: Any) -> None:
    """Degrees and sizes are positive integers (a YAML ``2.0``, ``true`` or ``"two"`` is not)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{name}: must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Plan:
    """Parallel layout, batch and memory policy for one training iteration."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallelism: None = tp (experts sharded like the dense MLP, ep
    #   inside dp·cp); 1 = Megatron-Core's MoE parallel folding (whole experts, ep over tp·cp·dp)
    zero: int = 0  # 0 none; 1 optimizer (Megatron distributed optimizer); 2 +grads; 3 +params (FSDP)
    micro_batch: int = 1
    global_batch: int = 1
    seq_len: int = 2048
    recompute: str = "none"
    recompute_layers: int | None = None  # with recompute "full": only the first N layers of each pipeline
    #   chunk are recomputed, the rest keep their activations (Megatron-LM's --recompute-method block
    #   --recompute-num-layers N); None: every layer
    recompute_every: int | None = None  # with recompute "full": only every N-th layer of each chunk, counted
    #   from its first (torchtitan's selective_ac_option = N, whose count runs over a rank's blocks)
    sequence_parallel: bool | None = None  # None: on whenever tp > 1 (Megatron-Core default)
    schedule: str = "1f1b"
    vpp: int = 1  # virtual pipeline stages per rank (interleaved schedule)
    microbatch_group: int | None = None  # interleaved: micro-batches that run through one chunk before the
    #   next (Megatron-Core's --microbatch-group-size-per-virtual-pipeline-stage, pp ≤ N ≤ micro-batches);
    #   None: pp, which needs the micro-batches to be a multiple of pp
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    precision: str = "bf16-mixed"
    offload: dict[str, str] = field(default_factory=dict)  # {"optimizer": "cpu", ...}
    overlap_grad_reduce: bool = True  # DP gradient reduction overlapped with backward
    cp_comm: str = "ring"  # context parallelism: ring attention (K/V blocks pass round the ring,
    #   overlapped with attention) or all-gather of K/V (Llama 3)
    ddp: str = "megatron"  # data-parallel wrapper: Megatron's (gradients live in its buffer) or PyTorch
    #   DDP ("torch": a second copy of the gradients in its 25 MiB communication buckets)
    overlap_p2p: bool = True  # pipeline sends overlap compute; False: the sender waits (Megatron 2021)
    grad_accumulation_fusion: bool | None = None  # weight-grad GEMMs accumulate in place (Megatron-Core's
    #   default); None: on for framework "megatron", off for "pytorch" (autograd adds into .grad)
    fp32_grads: bool = False  # accumulate and reduce gradients in fp32 (Megatron's main_grad): 18 B/param
    attention: str | None = None  # fused (no s² tensor): "flash" (FlashAttention-2, PyTorch SDPA's) or "cudnn"
    #   (cuDNN's, what Transformer Engine runs on Hopper and newer); or "unfused" (Megatron 2021: softmax
    #   over s²); None: "cudnn" for framework "megatron", "flash" for "pytorch".  On a device with no
    #   fitted cuDNN rates (A100, MI300X, Ascend, B200) "cudnn" is priced as that device's fused attention
    tp_backward_overlap: bool | None = None  # TP backward collectives beside the weight-/input-gradient GEMMs
    #   (Megatron-LM since 2021, Megatron-Core); None: on for framework "megatron", off for "pytorch"
    tp_comm_overlap: bool = False  # every sequence-parallel TP collective pipelined with the GEMM it feeds or
    #   drains, forward and backward: Megatron-Core's --tp-comm-overlap (Transformer Engine userbuffers),
    #   torchtitan's AsyncTP; only what outlasts the GEMM shows
    cross_entropy: str = "unfused"  # "unfused": the logits upcast to fp32 and a softmax's worth of passes
    #   (Megatron's vocab_parallel_cross_entropy, eager PyTorch's log_softmax + nll_loss); "fused": one kernel
    #   reads the 16-bit logits and keeps them for backward, which writes a 16-bit gradient (flash-attn's
    #   xentropy: llm-foundry's default loss_fn fused_crossentropy); no fp32 copy of the logits
    moe_dispatcher: str = "alltoall"  # MoE token dispatch: "alltoall" (Megatron-Core's alltoall dispatcher:
    #   tokens gathered into expert order, NCCL all-to-all, regrouped by local expert, and all of it undone
    #   on the way back, each a pass over the routed tokens) or "fused" (its flex dispatcher on DeepEP or
    #   HybridEP: the communication kernels write tokens in expert order and sum the top-k outputs)
    moe_a2a_overlap: bool = False  # Megatron-Core's EP overlap (--overlap-moe-expert-parallel-comm): in the
    #   1F1B steady state one micro-batch's layer forward runs beside another's layer backward, each one's
    #   all-to-alls beside the other's compute; warm-up forwards and cool-down backwards run alone
    framework: str = "megatron"  # "megatron": fused kernels, persistent grad buffer; "pytorch": eager
    #   modules (separate q/k/v and gate/up GEMMs, unfused RoPE and SwiGLU), gradients allocated in
    #   backward and freed by zero_grad(set_to_none=True), DDP bucket buffers

    def __post_init__(self) -> None:
        for name in INTEGER_FIELDS:
            check_positive_int(name, getattr(self, name))
        for name in ("first_stage_layers", "last_stage_layers", "etp", "recompute_layers", "recompute_every",
                     "microbatch_group"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        for name in BOOLEAN_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name in DEFAULTED_SWITCHES):
                raise PlanError(f"{name}: must be true or false, got {value!r}")
        if not isinstance(self.offload, dict):
            raise PlanError(f"offload: must map what to a tier (e.g. {{optimizer: cpu}}), got {self.offload!r}")
        if self.zero not in (0, 1, 2, 3):
            raise PlanError(f"zero: must be one of 0, 1, 2, 3, got {self.zero!r}")
        for name, allowed in (("recompute", RECOMPUTE), ("schedule", SCHEDULES), ("precision", PRECISIONS),
                              ("framework", FRAMEWORKS), ("attention", ATTENTION),
                              ("ddp", DDP_IMPLS), ("cp_comm", CP_COMMS), ("cross_entropy", CROSS_ENTROPY),
                              ("moe_dispatcher", MOE_DISPATCHERS)):
            if name == "attention" and self.attention is None:  # the framework's own, once it is known good
                object.__setattr__(self, "attention", DEFAULT_ATTENTION[self.framework])
            if getattr(self, name) not in allowed:
                raise PlanError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("recompute_layers", "recompute_every"):
            if getattr(self, name) is not None and self.recompute != "full":
                raise PlanError(f"{name}: {getattr(self, name)} needs recompute 'full' (the layers it picks are "
                                f"recomputed whole), got {self.recompute!r}")
        if self.recompute_layers is not None and self.recompute_every is not None:
            raise PlanError("recompute_every: give recompute_layers (the first N of a chunk) or recompute_every "
                            "(every N-th), not both")
        if self.recompute == "selective-op" and self.framework != "pytorch":
            raise PlanError("recompute: 'selective-op' is torchtitan's op-level selective AC and needs framework "
                            f"'pytorch' (got {self.framework!r}); Megatron's own is 'selective'")
        if self.sequence_parallel is None:
            object.__setattr__(self, "sequence_parallel", self.tp > 1)
        if self.grad_accumulation_fusion is None:
            object.__setattr__(self, "grad_accumulation_fusion", self.framework == "megatron")
        if self.tp_backward_overlap is None:
            object.__setattr__(self, "tp_backward_overlap", self.framework == "megatron")
        if self.tp_comm_overlap and self.tp > 1 and not self.sequence_parallel:
            raise PlanError("tp_comm_overlap: needs sequence_parallel (it overlaps the all-gathers and "
                            "reduce-scatters that sequence parallelism runs)")
        if self.moe_a2a_overlap:  # Megatron-Core's asserts (TransformerConfig.__post_init__)
            if self.ep == 1:
                raise PlanError("moe_a2a_overlap: needs expert parallelism (ep > 1): it hides the EP all-to-alls")
            if self.pp > 1 and self.schedule != "interleaved":
                raise PlanError(f"moe_a2a_overlap: with pp > 1 needs schedule 'interleaved' (Megatron-Core's "
                                f"combined 1F1B runs on virtual stages), got {self.schedule!r}")
            if self.recompute == "full":
                raise PlanError("moe_a2a_overlap: needs recompute 'none' or 'selective' (Megatron-Core refuses "
                                "full recomputation with it)")
        if self.vpp > 1 and self.schedule != "interleaved":
            raise PlanError(f"vpp: {self.vpp} needs schedule 'interleaved', got {self.schedule!r}")
        if self.schedule in ("interleaved", "zero-bubble") and self.pp == 1:
            raise PlanError(f"schedule: {self.schedule!r} needs pipeline stages (pp > 1); with pp 1 use '1f1b'")
        if self.etp not in (None, 1, self.tp):
            raise PlanError(f"etp: must be 1 (MoE parallel folding) or tp = {self.tp}, got {self.etp!r}")
        if self.expert_tp == self.tp and (self.dp * self.cp) % self.ep:
            raise PlanError(f"ep: {self.ep} must divide dp·cp = {self.dp * self.cp} (or give etp 1 to fold "
                            f"expert parallelism over tp·cp·dp)")
        if (self.tp * self.cp * self.dp) % (self.ep * self.expert_tp):
            raise PlanError(f"ep: {self.ep} must divide tp·cp·dp = {self.tp * self.cp * self.dp}")
        if self.expert_tp < self.tp and not self.sequence_parallel:
            raise PlanError("etp: 1 with tp > 1 needs sequence_parallel (each TP rank routes its own tokens)")
        if self.global_batch % (self.dp * self.micro_batch):
            raise PlanError(
                f"global_batch: {self.global_batch} is not a multiple of dp·micro_batch = "
                f"{self.dp}·{self.micro_batch} = {self.dp * self.micro_batch}")
        if self.seq_len % self.cp:
            raise PlanError(f"cp: {self.cp} must divide seq_len {self.seq_len}")
        for what, tier in self.offload.items():
            if what not in OFFLOADABLE:
                raise PlanError(f"offload: {what!r} is not one of {', '.join(OFFLOADABLE)}")
            if tier not in TIERS:
                raise PlanError(f"offload.{what}: {tier!r} is not one of {', '.join(TIERS)}")
        self._check_microbatch_group()

    def _check_microbatch_group(self) -> None:
        """Megatron-Core's rules for the interleaved schedule's micro-batch groups: pp ≤ N ≤ m,
        and a last, smaller group of at least pp (a shorter one would stall the pipeline)."""
        m, n = self.num_microbatches, self.microbatch_group
        interleaving = self.schedule == "interleaved" and self.pp > 1 and self.vpp > 1
        if n is None:
            if interleaving and m % self.pp:
                raise PlanError(
                    f"global_batch: the interleaved schedule needs micro-batches ({m}) to be a multiple of pp "
                    f"({self.pp}), or a microbatch_group between pp and {m} that leaves a last group of 0 or at "
                    f"least pp")
            return
        if not interleaving:
            raise PlanError("microbatch_group: applies to the interleaved schedule only (schedule interleaved, "
                            "pp > 1, vpp > 1)")
        if not self.pp <= n <= m:
            raise PlanError(f"microbatch_group: {n} must be between pp ({self.pp}) and the micro-batches ({m})")
        if 0 < m % n < self.pp:
            raise PlanError(f"microbatch_group: {n} leaves a last group of {m % n} micro-batches, fewer than pp "
                            f"({self.pp}); pick one that divides {m} or leaves at least {self.pp}")

    def placement(self, what: str) -> str:
        """Where ``what`` (params, grads, optimizer, activations) lives: its ``offload`` tier or the GPU."""
        return self.offload.get(what, "gpu")

    @property
    def partial_recompute(self) -> bool:
        """Only some layers recomputed (``recompute_layers`` or ``recompute_every``)."""
        return self.recompute_layers is not None or self.recompute_every is not None

    def layer_recomputed(self, chunk_first_layer: int, layer: int) -> bool:
        """Whether ``layer`` of the chunk starting at ``chunk_first_layer`` runs the plan's
        recomputation: every layer, the chunk's first ``recompute_layers``, or every
        ``recompute_every``-th of it."""
        i = layer - chunk_first_layer
        if self.recompute_layers is not None:
            return i < self.recompute_layers
        if self.recompute_every is not None:
            return (i + 1) % self.recompute_every == 0
        return True

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def expert_tp(self) -> int:
        """The ranks each expert's weights are split over: ``etp``, or tp where it is not given."""
        return self.tp if self.etp is None else self.etp

    @property
    def expert_dp(self) -> int:
        """Data-parallel replicas of each expert: the tp·cp·dp ranks over etp·ep."""
        return self.tp * self.cp * self.dp // (self.ep * self.expert_tp)

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per pipeline per iteration (Megatron's ``num_microbatches``)."""
        return self.global_batch // (self.dp * self.micro_batch)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def replace(self, **changes: Any) -> "Plan":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"plan: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        return cls(**data)
