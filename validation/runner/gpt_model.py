"""A GPT as Megatron-LM ran it in 2021 (Narayanan et al. SC'21, Table 1), in eager PyTorch.

Built from a GPT-2 style Hugging Face ``config.json`` (``configs/gpt-1.7b.json``): learned
position embeddings, LayerNorm, biases on every linear, GELU MLP of width ``n_inner`` (4h),
tied input/output embeddings, dropout ``p`` on the embeddings, the attention probabilities and
after the attention and MLP outputs.  Megatron's ``[s, b, h]`` layout, so that q, k and v are
views of the fused QKV output and the batched GEMMs run strided with no copies.

Per layer, in the order a step runs it (``UNFUSED`` attention, Megatron's non-fused path):
LayerNorm -> fused QKV linear ``[s, b, 3h]`` (bias) -> views q, k, v ``[s, b·a, d]`` ->
``scores = torch.baddbmm(empty, q, kᵀ, beta=0, alpha=1/sqrt(d))`` ``[b·a, s, s]`` ->
``masked_fill_`` with the causal mask (-10000, in place, as Megatron's ``attention_mask_func``) ->
``torch.softmax`` -> dropout -> ``torch.bmm(probs, v)`` -> permute to ``[s, b, h]`` (a copy) ->
output linear (bias) -> dropout -> residual add -> LayerNorm -> fc1 (bias) ->
``F.gelu(approximate=activation)`` -> fc2 (bias) -> dropout -> residual add.  After the layers: final
LayerNorm, logits with the tied embedding ``[s, b, V]`` bf16, ``.float()`` and ``F.cross_entropy``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from plansim.validation.runner.common import HFConfig

#: HF activation_function -> F.gelu's ``approximate``
GELU_APPROX = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class GPTConfig(HFConfig):
    name: str
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_pos: int
    eps: float
    dropout: float
    approximate: str

    @classmethod
    def from_hf(cls, path: str) -> "GPTConfig":
        name, c = cls.read_hf(path)
        if c.get("model_type") != "gpt2":
            raise ValueError(f"{path}: model_type must be gpt2, got {c.get('model_type')!r}")
        h = c["n_embd"]
        return cls(name=name, hidden=h, layers=c["n_layer"],
                   heads=c["n_head"], ffn=c.get("n_inner") or 4 * h, vocab=c["vocab_size"],
                   max_pos=c.get("n_positions", 1024), eps=c.get("layer_norm_epsilon", 1e-5),
                   dropout=float(c.get("resid_pdrop", 0.1)),
                   approximate=GELU_APPROX[c.get("activation_function", "gelu_new")])

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def n_params(self) -> int:
        """Exact parameter count: tied embeddings, learned positions, biases, LayerNorm weight+bias."""
        h, f = self.hidden, self.ffn
        layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
        return self.layers * layer + self.vocab * h + self.max_pos * h + 2 * h


class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        h, f = cfg.hidden, cfg.ffn
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(h, eps=cfg.eps)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.ln2 = nn.LayerNorm(h, eps=cfg.eps)
        self.fc1 = nn.Linear(h, f)
        self.fc2 = nn.Linear(f, h)

    def attention(self, x, mask):
        s, b, h = x.shape
        a, d, p = self.cfg.heads, self.cfg.head_dim, self.cfg.dropout
        qkv = self.qkv(x).view(s, b * a, 3 * d)  # Megatron: [s, b, np, 3·hn], split along the last dim
        q, k, v = qkv.split(d, dim=-1)  # views [s, b·a, d]
        scores = torch.empty(b * a, s, s, dtype=x.dtype, device=x.device)
        scores = torch.baddbmm(scores, q.transpose(0, 1), k.transpose(0, 1).transpose(1, 2),
                               beta=0.0, alpha=1.0 / math.sqrt(d))
        scores = scores.view(b, a, s, s).masked_fill_(mask, -10000.0)
        probs = F.dropout(torch.softmax(scores, dim=-1), p, self.training)
        ctx = torch.bmm(probs.view(b * a, s, s), v.transpose(0, 1))  # [b·a, s, d]
        ctx = ctx.view(b, a, s, d).permute(2, 0, 1, 3).reshape(s, b, h)  # a copy, as Megatron's .contiguous()
        return self.proj(ctx)

    def forward(self, x, mask):
        p = self.cfg.dropout
        x = x + F.dropout(self.attention(self.ln1(x), mask), p, self.training)
        y = self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate=self.cfg.approximate))
        return x + F.dropout(y, p, self.training)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, *, recompute: str = "none"):
        super().__init__()
        self.cfg, self.recompute = cfg, recompute
        self.wte = nn.Embedding(cfg.vocab, cfg.hidden)
        self.wpe = nn.Embedding(cfg.max_pos, cfg.hidden)
        self.layers = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self._mask = None

    def causal_mask(self, s, device):
        if self._mask is None or self._mask.shape[-1] != s or self._mask.device != device:
            self._mask = torch.ones(s, s, dtype=torch.bool, device=device).triu_(1).view(1, 1, s, s)
        return self._mask

    def forward(self, ids):
        b, s = ids.shape
        pos = torch.arange(s, device=ids.device)
        x = (self.wte(ids) + self.wpe(pos)).transpose(0, 1).contiguous()  # [s, b, h], Megatron's layout
        x = F.dropout(x, self.cfg.dropout, self.training)
        mask = self.causal_mask(s, ids.device)
        for blk in self.layers:
            if self.recompute == "full" and torch.is_grad_enabled():
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied: [s, b, V]

    def loss(self, logits, target):
        """Mean cross-entropy on fp32-upcast logits; ``target`` is ``[b, s]``."""
        return F.cross_entropy(logits.float().flatten(0, 1), target.transpose(0, 1).flatten())


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """LayerNorm weights 1 and biases 0; every other tensor N(0, 0.02) (linear biases too)."""
    gen = None
    for name, p in model.named_parameters():
        if gen is None:
            gen = torch.Generator(device=p.device)
            gen.manual_seed(seed)
        if ".ln" in name or name.startswith("ln_"):
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32) * 0.02)


def build(cfg: GPTConfig, device, seed: int = 0, recompute: str = "none") -> GPT:
    with torch.device("meta"):
        model = GPT(cfg, recompute=recompute)
    model = model.to(torch.bfloat16)
    model.to_empty(device=device)
    init_weights(model, seed)
    model.train()
    return model
