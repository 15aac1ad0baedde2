"""A Llama-style decoder built from a Hugging Face ``config.json``, with optional Megatron TP.

Layers, in the order a step runs them (per layer): RMSNorm (``F.rms_norm``) -> q, k, v
projections (three GEMMs, no bias) -> RoPE on q and k -> ``F.scaled_dot_product_attention``
(``is_causal=True``; grouped-query attention through ``enable_gqa=True`` when the flash
kernel takes it, else k/v repeated) -> output projection -> residual add -> RMSNorm -> gate
and up projections -> SiLU(gate) * up -> down projection -> residual add.  Then a final
RMSNorm, an untied LM head (bf16 logits) and cross-entropy on the fp32-upcast logits.

Tensor parallelism (``tp_group``) follows Megatron-LM without sequence parallelism:
column-parallel q/k/v/gate/up/LM head (identity forward, all-reduce of the input gradient
backward: ``_CopyToTP``), row-parallel o/down (all-reduce forward: ``_ReduceFromTP``),
vocabulary-parallel embedding (masked lookup + all-reduce) and vocabulary-parallel
cross-entropy (all-reduces of max, target logit and sum of exp; Megatron's
``_VocabParallelCrossEntropy``).  Norm weights are replicated and get identical gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from plansim.validation.runner.common import HFConfig


@dataclass(frozen=True)
class LlamaConfig(HFConfig):
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    eps: float
    rope_theta: float
    tied: bool

    @classmethod
    def from_hf(cls, path: str) -> "LlamaConfig":
        name, c = cls.read_hf(path)
        heads = c["num_attention_heads"]
        return cls(
            name=name,
            hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
            kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            ffn=c["intermediate_size"], vocab=c["vocab_size"], eps=c.get("rms_norm_eps", 1e-5),
            rope_theta=c.get("rope_theta", 10000.0), tied=bool(c.get("tie_word_embeddings", False)),
        )

    def n_params(self) -> int:
        """Exact parameter count (no biases; untied head unless ``tied``)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = h * q + 2 * h * kv + q * h + 3 * h * self.ffn + 2 * h
        return self.layers * layer + self.vocab * h * (1 if self.tied else 2) + h


# --- tensor-parallel autograd functions ---------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def copy_to_tp(x, group):
    return x if group is None else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return x if group is None else _ReduceFromTP.apply(x, group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss from fp32 logits sharded over the vocabulary (Megatron-LM)."""

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start):
        lmax = logits.max(dim=-1)[0]
        dist.all_reduce(lmax, op=dist.ReduceOp.MAX, group=group)
        logits = logits - lmax.unsqueeze(-1)
        n_local = logits.size(-1)
        mask = (target < vocab_start) | (target >= vocab_start + n_local)
        local_t = (target - vocab_start).masked_fill(mask, 0)
        pred = logits.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(mask, 0.0)
        dist.all_reduce(pred, group=group)
        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = torch.log(sum_exp) - pred
        exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(exp, mask, local_t)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, mask, local_t = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -(~mask).unsqueeze(-1).to(grad.dtype))
        grad.mul_(g.unsqueeze(-1))
        return grad, None, None, None


def op_sac_context():
    """torchtitan's op-level selective activation checkpointing (``selective_ac_option = 'op'``),
    as its ``parallelize_llama`` had it in December 2024: keep what ``aten.mm`` and the fused SDPA
    kernels return, except each second ``mm`` of the block (counted afresh per checkpointed call,
    forward and recomputation apart); recompute the rest.  One context pair per call."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    mm = torch.ops.aten.mm.default
    keep = {mm} | {getattr(torch.ops.aten, name).default for name in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention") if hasattr(torch.ops.aten, name)}
    count = {False: 0, True: 0}  # mm calls seen, by ctx.is_recompute

    def policy(ctx, func, *args, **kwargs):
        if func == mm:
            count[ctx.is_recompute] += 1
            if count[ctx.is_recompute] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


# --- modules ------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: int, tp_group):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.heads // tp, cfg.kv_heads // tp, cfg.head_dim
        self.group = tp_group
        h = cfg.hidden
        self.wq = nn.Parameter(torch.empty(self.nh * self.hd, h))
        self.wk = nn.Parameter(torch.empty(self.nkv * self.hd, h))
        self.wv = nn.Parameter(torch.empty(self.nkv * self.hd, h))
        self.wo = nn.Parameter(torch.empty(h, self.nh * self.hd))
        self.native_gqa = True
        self.sdpa_backends = None

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        x = copy_to_tp(x, self.group)
        q = F.linear(x, self.wq).view(b, s, self.nh, self.hd).transpose(1, 2)
        k = F.linear(x, self.wk).view(b, s, self.nkv, self.hd).transpose(1, 2)
        v = F.linear(x, self.wv).view(b, s, self.nkv, self.hd).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        gqa = self.nkv != self.nh
        if gqa and not self.native_gqa:
            k = k.repeat_interleave(self.nh // self.nkv, dim=1)
            v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        if self.sdpa_backends is not None:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(self.sdpa_backends):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa and self.native_gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa and self.native_gqa)
        o = o.transpose(1, 2).reshape(b, s, self.nh * self.hd)
        return reduce_from_tp(F.linear(o, self.wo), self.group)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: int, tp_group):
        super().__init__()
        self.group = tp_group
        f, h = cfg.ffn // tp, cfg.hidden
        self.w_gate = nn.Parameter(torch.empty(f, h))
        self.w_up = nn.Parameter(torch.empty(f, h))
        self.w_down = nn.Parameter(torch.empty(h, f))

    def forward(self, x):
        x = copy_to_tp(x, self.group)
        y = F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up)
        return reduce_from_tp(F.linear(y, self.w_down), self.group)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: int, tp_group):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.attn = Attention(cfg, tp, tp_group)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.mlp = MLP(cfg, tp, tp_group)

    def forward(self, x, cos, sin):
        h = x + self.attn(self.attn_norm(x), cos, sin)
        return h + self.mlp(self.mlp_norm(h))


class Embedding(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: int, tp_rank: int, tp_group):
        super().__init__()
        self.group = tp_group
        self.n_local = cfg.vocab // tp
        self.start = tp_rank * self.n_local
        self.weight = nn.Parameter(torch.empty(self.n_local, cfg.hidden))

    def forward(self, ids):
        if self.group is None:
            return F.embedding(ids, self.weight)
        mask = (ids < self.start) | (ids >= self.start + self.n_local)
        out = F.embedding((ids - self.start).masked_fill(mask, 0), self.weight)
        out = out.masked_fill(mask.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)


class LMHead(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: int, tp_group):
        super().__init__()
        self.group = tp_group
        self.weight = nn.Parameter(torch.empty(cfg.vocab // tp, cfg.hidden))

    def forward(self, x):
        return F.linear(copy_to_tp(x, self.group), self.weight)


class Transformer(nn.Module):
    """Llama decoder; ``layer_range``/``first``/``last`` build one pipeline stage of it."""

    def __init__(self, cfg: LlamaConfig, *, tp: int = 1, tp_rank: int = 0, tp_group=None,
                 layer_range: tuple[int, int] | None = None, first: bool = True, last: bool = True,
                 recompute: str = "none"):
        super().__init__()
        if cfg.heads % tp or cfg.kv_heads % tp or cfg.ffn % tp or cfg.vocab % tp:
            raise ValueError(f"tp={tp} must divide heads, kv_heads, ffn and vocab of {cfg.name}")
        self.cfg, self.recompute, self.tp_group = cfg, recompute, tp_group
        self.vocab_start = tp_rank * (cfg.vocab // tp)
        lo, hi = layer_range or (0, cfg.layers)
        self.embed = Embedding(cfg, tp, tp_rank, tp_group) if first else None
        # a ModuleDict keyed by the global layer index keeps FQNs stable across stages
        self.layers = nn.ModuleDict({str(i): Block(cfg, tp, tp_group) for i in range(lo, hi)})
        self.norm = RMSNorm(cfg.hidden, cfg.eps) if last else None
        self.lm_head = LMHead(cfg, tp, tp_group) if last else None
        self._rope = None

    def set_attention(self, native_gqa: bool, backends) -> None:
        for blk in self.layers.values():
            blk.attn.native_gqa = native_gqa
            blk.attn.sdpa_backends = backends

    def rope(self, seq: int, device, dtype):
        if self._rope is None or self._rope[0].shape[0] != seq or self._rope[0].device != device:
            d = self.cfg.head_dim
            inv = 1.0 / self.cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
            f = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
            emb = torch.cat((f, f), dim=-1)
            self._rope = (emb.cos().to(dtype), emb.sin().to(dtype))
        return self._rope

    def forward(self, x):
        h = self.embed(x) if self.embed is not None else x
        cos, sin = self.rope(h.shape[1], h.device, h.dtype)
        for blk in self.layers.values():
            if self.recompute == "full" and torch.is_grad_enabled():
                h = checkpoint(blk, h, cos, sin, use_reentrant=False)
            elif self.recompute == "selective-op" and torch.is_grad_enabled():
                h = checkpoint(blk, h, cos, sin, use_reentrant=False, context_fn=op_sac_context)
            else:
                h = blk(h, cos, sin)
        if self.lm_head is None:
            return h
        return self.lm_head(self.norm(h))

    def loss(self, logits, target):
        """Mean cross-entropy on fp32-upcast logits (vocabulary-parallel under TP)."""
        logits = logits.float()
        if self.tp_group is None:
            return F.cross_entropy(logits.flatten(0, 1), target.flatten())
        per_token = _VocabParallelCrossEntropy.apply(logits.flatten(0, 1), target.flatten(),
                                                     self.tp_group, self.vocab_start)
        return per_token.mean()


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Norm weights 1, everything else N(0, 0.02), on the local shard (DTensor or plain)."""
    gen = None
    for name, p in model.named_parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        if gen is None:
            gen = torch.Generator(device=t.device)
            gen.manual_seed(seed)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.copy_(torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float32) * 0.02)


def pick_attention(model: Transformer, device: torch.device, backend: str = "flash") -> str:
    """Force SDPA's ``backend`` on CUDA (``flash``: FlashAttention-2; ``cudnn``: cuDNN's fused
    attention); use native GQA if the kernel takes it, else repeat k/v."""
    if device.type != "cuda":
        model.set_attention(True, None)
        return "default-gqa"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION if backend == "cudnn" else SDPBackend.FLASH_ATTENTION]
    q = torch.randn(1, 4, 64, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(1, 2, 64, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    try:
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).sum().backward()
        model.set_attention(True, backends)
        return f"{backend}-gqa"
    except RuntimeError:
        model.set_attention(False, backends)
        return f"{backend}-repeat_kv"
