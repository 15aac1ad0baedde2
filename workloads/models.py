"""Model specifications: the architecture numbers that FLOPs, memory and time depend on.

A ``ModelSpec`` is built from a built-in name, a Hugging Face ``config.json`` or a YAML spec
(see ``workloads/model_io.py``).  Parameter counts are exact for the architectures named in
the fields (tested: Llama-3-8B 8.03 B, Llama-3-70B 70.6 B, GPT-3 175B 174.6 B, DeepSeek-V3 671 B
with 37 B active).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal


class ModelError(ValueError):
    """A model specification that is malformed."""


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer, dense or mixture-of-experts."""

    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden: int
    vocab: int
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    position: Literal["rope", "learned"] = "rope"
    max_seq_len: int = 8192
    tied_embeddings: bool = False
    bias: bool = False  # linear-layer biases (GPT-2/3, NeoX); QKV-only biases via qkv_bias
    qkv_bias: bool = False  # Qwen2 style
    head_dim: int | None = None  # query/key head width; defaults to hidden / num_heads
    # multi-head latent attention (DeepSeek-V2/V3, Megatron-Core MLASelfAttention) where kv_lora_rank > 0:
    # keys and values are projected up per head from a latent of kv_lora_rank (plus a shared rotary
    # key of qk_rope_head_dim), queries from one of q_lora_rank (0: straight from the hidden state);
    # head_dim is the query/key head (no-position part + qk_rope_head_dim), v_head_dim the value head
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int | None = None  # defaults to head_dim
    num_experts: int = 0  # 0 = dense
    top_k: int = 1
    shared_experts: int = 0
    moe_ffn_hidden: int | None = None  # per-expert FFN width (defaults to ffn_hidden)
    moe_layer_freq: int = 1  # every k-th layer is MoE
    first_dense_layers: int = 0  # leading dense layers before the MoE ones (DeepSeek first_k_dense_replace)
    dropout: bool = False  # training with dropout (GPT-2/3 style): masks are saved for backward

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden", "num_heads", "num_kv_heads", "ffn_hidden", "vocab", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ModelError(f"{f}: must be a positive integer, got {v!r}")
        for f, allowed in (("mlp", ("swiglu", "gelu")), ("norm", ("rmsnorm", "layernorm")),
                           ("position", ("rope", "learned"))):
            if getattr(self, f) not in allowed:
                raise ModelError(f"{f}: must be one of {', '.join(allowed)}, got {getattr(self, f)!r}")
        for f in ("num_experts", "shared_experts", "first_dense_layers", "q_lora_rank", "kv_lora_rank",
                  "qk_rope_head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ModelError(f"{f}: must be a non-negative integer, got {v!r}")
        for f in ("top_k", "moe_layer_freq", "head_dim", "moe_ffn_hidden", "v_head_dim"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ModelError(f"{f}: must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"num_kv_heads: {self.num_kv_heads} must divide num_heads {self.num_heads}")
        if self.head_dim is None:
            if self.hidden % self.num_heads:
                raise ModelError(f"num_heads: {self.num_heads} must divide hidden {self.hidden}")
            object.__setattr__(self, "head_dim", self.hidden // self.num_heads)
        for f in ("tied_embeddings", "bias", "qkv_bias", "dropout"):
            if not isinstance(getattr(self, f), bool):
                raise ModelError(f"{f}: must be true or false, got {getattr(self, f)!r}")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ModelError(f"top_k: must be in 1..num_experts={self.num_experts}, got {self.top_k}")
        if self.num_experts and self.first_dense_layers >= self.num_layers:
            raise ModelError(f"first_dense_layers: {self.first_dense_layers} leaves no MoE layer among "
                             f"num_layers {self.num_layers}")
        if self.moe_ffn_hidden is None:
            object.__setattr__(self, "moe_ffn_hidden", self.ffn_hidden)
        if self.v_head_dim is None:
            object.__setattr__(self, "v_head_dim", self.head_dim)
        if self.kv_lora_rank:
            if self.num_kv_heads != self.num_heads:
                raise ModelError(f"num_kv_heads: multi-head latent attention projects every head's keys and values "
                                 f"(num_kv_heads must equal num_heads {self.num_heads}, got {self.num_kv_heads})")
            if not 0 < self.qk_rope_head_dim < self.head_dim:
                raise ModelError(f"qk_rope_head_dim: must be in 1..head_dim-1 = {self.head_dim - 1} with "
                                 f"kv_lora_rank, got {self.qk_rope_head_dim}")
        elif self.q_lora_rank or self.qk_rope_head_dim or self.v_head_dim != self.head_dim:
            raise ModelError("kv_lora_rank: q_lora_rank, qk_rope_head_dim and v_head_dim describe multi-head latent "
                             "attention, which needs kv_lora_rank > 0")

    # --- shapes -----------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def v_dim(self) -> int:
        return self.num_kv_heads * self.v_head_dim

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0


    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of width ffn in one MLP: SwiGLU has gate, up, down; GELU up, down."""
        return 3 if self.mlp == "swiglu" else 2

    def is_moe_layer(self, layer: int) -> bool:
        """Layer ``layer`` (0-based) has routed experts: past the leading dense layers, every
        ``moe_layer_freq``-th one (Megatron ``--moe-layer-freq``; DeepSeek ``first_k_dense_replace``)."""
        return (self.is_moe and layer >= self.first_dense_layers
                and layer % self.moe_layer_freq == self.moe_layer_freq - 1)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    # --- parameters ---------------------------------------------------------------------------
    @property
    def attention_params(self) -> int:
        h = self.hidden
        if self.is_mla:  # latents and their up projections (keys' no-position part and values), output
            q_up = (self.q_lora_rank if self.q_lora_rank else h) * self.q_dim
            kv_up = self.kv_lora_rank * self.num_heads * (self.head_dim - self.qk_rope_head_dim + self.v_head_dim)
            return self.replicated_attention_params + q_up + kv_up + self.v_dim * h
        weights = h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h
        biases = 0
        if self.bias:
            biases = self.q_dim + 2 * self.kv_dim + h
        elif self.qkv_bias:
            biases = self.q_dim + 2 * self.kv_dim
        return weights + biases

    @property
    def replicated_attention_params(self) -> int:
        """Attention parameters every TP rank holds whole (the rest are split over TP): MLA's down
        projections and the norms of their latents (Megatron-Core builds them ``duplicated``)."""
        if not self.is_mla:
            return 0
        q = self.hidden * self.q_lora_rank + self.q_lora_rank if self.q_lora_rank else 0
        return q + self.hidden * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank

    def _mlp_params(self, width: int) -> int:
        weights = self.mlp_matrices * self.hidden * width
        biases = ((self.mlp_matrices - 1) * width + self.hidden) if self.bias else 0
        return weights + biases

    @property
    def dense_mlp_params(self) -> int:
        return self._mlp_params(self.ffn_hidden)

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return self._mlp_params(self.moe_ffn_hidden)

    @property
    def moe_mlp_params(self) -> int:
        router = self.hidden * self.num_experts
        return router + (self.num_experts + self.shared_experts) * self.expert_params

    @property
    def norm_params(self) -> int:
        """Two norms per layer; LayerNorm has a bias as well as a scale."""
        return 2 * self.hidden * (2 if self.norm == "layernorm" else 1)

    def layer_params(self, layer: int) -> int:
        mlp = self.moe_mlp_params if self.is_moe_layer(layer) else self.dense_mlp_params
        return self.attention_params + mlp + self.norm_params

    @property
    def embedding_params(self) -> int:
        pos = self.max_seq_len * self.hidden if self.position == "learned" else 0
        return self.vocab * self.hidden + pos

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def final_norm_params(self) -> int:
        return self.hidden * (2 if self.norm == "layernorm" else 1)

    @property
    def num_params(self) -> int:
        """Total parameters, every expert counted."""
        layers = sum(self.layer_params(i) for i in range(self.num_layers))
        return layers + self.embedding_params + self.lm_head_params + self.final_norm_params

    @property
    def num_active_params(self) -> int:
        """Parameters a token passes through (routed experts: top_k of them)."""
        if not self.is_moe:
            return self.num_params
        inactive = (self.num_experts - self.top_k) * self.expert_params * self.num_moe_layers
        return self.num_params - inactive

    # --- FLOPs ----------------------------------------------------------------------------------
    def model_flops_per_token(self, seq_len: int) -> float:
        """Training model FLOPs per token, forward + backward (3× forward), no recomputation.

        The convention of Megatron-LM's ``num_floating_point_operations`` (DESIGN.md, Metric
        definitions): GEMMs of attention projections (GQA-aware), MLP (active experts for MoE,
        plus the router), logits, and attention scores QKᵀ and ·V without halving for causality.
        Multi-head latent attention: its down and up projections and output projection (the
        weights of ``attention_params``, norms aside), scores at the query/key head width, ·V at
        the value head width (Megatron-LM's MLA branch, before its causal halving).
        """
        h, s = self.hidden, seq_len
        if self.is_mla:
            projections = 2 * (self.attention_params - self.q_lora_rank - self.kv_lora_rank)
        else:
            projections = 2 * h * (self.q_dim + 2 * self.kv_dim) + 2 * self.q_dim * h  # QKV + out proj
        fwd = 0.0
        for layer in range(self.num_layers):
            fwd += projections
            fwd += 2 * s * self.num_heads * (self.head_dim + self.v_head_dim)  # scores and scores·V, per token
            if self.is_moe_layer(layer):
                width = self.moe_ffn_hidden * (self.top_k + self.shared_experts)
                fwd += 2 * self.mlp_matrices * h * width + 2 * h * self.num_experts
            else:
                fwd += 2 * self.mlp_matrices * h * self.ffn_hidden
        fwd += 2 * h * self.vocab  # logits
        return 3.0 * fwd

    def to_dict(self) -> dict:
        return asdict(self)
