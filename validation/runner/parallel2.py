"""Suite ``parallel2``: 2-GPU training steps of expert parallelism (EP) and context parallelism (CP).

Writes ``steps_parallel2.csv`` with the ``steps`` columns (not part of ``all``); see MEASURING.md,
"Suite parallel2".  Precision, optimizer, timing and peak memory as in the steps suite (``steps.py``).

* ``ep`` (dp = 2, ep = 2): a Mixtral-style MoE decoder (``configs/mixtral-8x-2.4b.json``).  Attention,
  norms, router, embedding and LM head are replicated and data-parallel (PyTorch DDP with the expert
  weights excluded); each rank holds ``E / 2`` experts.  Per MoE layer: router ``F.linear`` ->
  fp32 softmax -> top-k -> weights renormalised to sum 1 (Mixtral) -> token copies sorted by expert ->
  per-expert counts exchanged (``all_to_all_single`` of ``E`` int64, then one host sync) -> tokens
  dispatched by ``all_to_all_single`` with *uneven* splits (dropless, no capacity factor, no padding) ->
  regrouped by local expert -> SwiGLU per local expert (three GEMMs each) -> un-grouped -> second
  ``all_to_all_single`` back -> weighted sum of the top-k copies.  Backward runs the two all-to-alls
  in reverse.  No auxiliary load-balancing loss.
* ``cp`` (cp = 2, dp = 1): the Llama model (``tinyllama-1.1b``), the sequence split over the ranks in
  the load-balanced zigzag order (2·cp chunks; rank r holds chunks r and 2·cp−1−r).  Per layer, K and V
  (after RoPE, local) are all-gathered in one ``all_gather_into_tensor`` (Llama 3 style), reordered
  into sequence order, and each local query chunk attends to the keys up to its own end with a
  lower-right causal flash kernel; the backward reduce-scatters the K/V gradients
  (``reduce_scatter_tensor``).  Parameters are replicated; gradients all-reduced by PyTorch DDP.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from plansim.validation.runner import steps as _steps
from plansim.validation.runner.common import CONFIG_DIR
from plansim.validation.runner.model import (Attention, Block, LlamaConfig, RMSNorm, Transformer, _rotate,
                                             init_weights, pick_attention)

MOE_MODEL, CP_MODEL = "mixtral-8x-2.4b", "tinyllama-1.1b"


# --- cases -------------------------------------------------------------------------------
def _case(model, strategy, *, dp, ep=1, cp=1, mb, seq):
    base = _steps._case(model, strategy, dp=dp, mb=mb, seq=seq)
    # the steps columns have no ep or cp: the degree is in the case id (and the strategy)
    deg = f"-ep{ep}" if strategy == "ep" else f"-cp{cp}"
    base["case_id"] = base["case_id"].replace(f"-dp{dp}-", f"-dp{dp}{deg}-")
    return base


def cases(quick: bool, n: int = 2) -> list[dict]:
    if quick:
        return [_case("moe-tiny", "ep", dp=n, ep=n, mb=2, seq=64),
                _case("tiny", "cp", dp=1, cp=n, mb=1, seq=64)]
    return ([_case(MOE_MODEL, "ep", dp=n, ep=n, mb=mb, seq=2048) for mb in (2, 4)]
            + [_case(CP_MODEL, "cp", dp=1, cp=n, mb=1, seq=s) for s in (8192, 16384)])


# --- autograd collectives ------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        gx = g.new_empty((sum(in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(gx, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return gx, None, None, None


class _GatherSeq(torch.autograd.Function):
    """``all_gather_into_tensor`` along a new leading rank dim; backward ``reduce_scatter_tensor`` (sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))  # concatenated along dim 0
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out.view((world,) + tuple(x.shape))

    @staticmethod
    def backward(ctx, g):
        gx = g.new_empty(g.shape[1:])
        flat = g.contiguous().view((-1,) + tuple(g.shape[2:]))
        if g.is_cuda:
            dist.reduce_scatter_tensor(gx, flat, group=ctx.group)
        else:  # gloo has no reduce_scatter_tensor: all-reduce, keep this rank's part (smoke test only)
            dist.all_reduce(flat, group=ctx.group)
            gx.copy_(flat.view(g.shape)[dist.get_rank(ctx.group)])
        return gx, None


# --- expert parallelism ----------------------------------------------------------------------
@dataclass(frozen=True)
class MoEConfig:
    base: LlamaConfig
    experts: int
    top_k: int

    @classmethod
    def named(cls, name: str) -> "MoEConfig":
        path = os.path.join(CONFIG_DIR, f"{name}.json")
        _, c = LlamaConfig.read_hf(path)
        return cls(LlamaConfig.from_hf(path), c["num_local_experts"], c["num_experts_per_tok"])

    def n_params(self) -> int:
        """All parameters of the model (every expert and the router), as plansim's ``load_model`` counts."""
        b = self.base
        dense_mlp = 3 * b.hidden * b.ffn
        return b.n_params() + b.layers * ((self.experts - 1) * dense_mlp + b.hidden * self.experts)


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig, rank: int, world: int, group):
        super().__init__()
        h, f = cfg.base.hidden, cfg.base.ffn
        self.E, self.k, self.world, self.group = cfg.experts, cfg.top_k, world, group
        self.n_local = cfg.experts // world
        self.router = nn.Parameter(torch.empty(cfg.experts, h))
        self.w_gate = nn.Parameter(torch.empty(self.n_local, f, h))
        self.w_up = nn.Parameter(torch.empty(self.n_local, f, h))
        self.w_down = nn.Parameter(torch.empty(self.n_local, h, f))

    def forward(self, x):
        b, s, h = x.shape
        x2 = x.reshape(b * s, h)
        probs = F.linear(x2, self.router).float().softmax(-1)
        w, idx = probs.topk(self.k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)  # [T, k]
        flat = idx.flatten()  # [T·k]: token t's copies at t·k .. t·k + k - 1
        order = flat.argsort(stable=True)
        xs = x2.index_select(0, order // self.k)  # copies sorted by expert
        counts = torch.bincount(flat, minlength=self.E)
        if self.world == 1:
            recv = counts
        else:
            recv = torch.empty_like(counts)
            dist.all_to_all_single(recv, counts, group=self.group)  # [source rank, local expert]
        host = torch.stack([counts, recv]).cpu()  # the one host sync of the layer
        send = host[0].view(self.world, self.n_local).sum(1).tolist()
        rc = host[1].view(self.world, self.n_local)
        got = _AllToAll.apply(xs, rc.sum(1).tolist(), send, self.group) if self.world > 1 else xs
        # regroup the received rows (source-major) by local expert
        start = torch.cumsum(rc.flatten(), 0) - rc.flatten()
        start = start.view(self.world, self.n_local)
        perm = torch.cat([torch.arange(int(start[r, e]), int(start[r, e] + rc[r, e]))
                          for e in range(self.n_local) for r in range(self.world)]).to(x.device, non_blocking=True)
        grouped = got.index_select(0, perm)
        outs, lo = [], 0
        for e, n in enumerate(rc.sum(0).tolist()):
            t = grouped[lo:lo + n]
            outs.append(F.linear(F.silu(F.linear(t, self.w_gate[e])) * F.linear(t, self.w_up[e]), self.w_down[e]))
            lo += n
        y = torch.cat(outs).index_select(0, torch.argsort(perm))
        back = _AllToAll.apply(y, send, rc.sum(1).tolist(), self.group) if self.world > 1 else y
        copies = back.index_select(0, torch.argsort(order)).view(b * s, self.k, h)
        return (copies * w.unsqueeze(-1)).sum(1).view(b, s, h)


class MoEBlock(Block):
    def __init__(self, cfg: MoEConfig, rank, world, group):
        nn.Module.__init__(self)
        self.attn_norm = RMSNorm(cfg.base.hidden, cfg.base.eps)
        self.attn = Attention(cfg.base, 1, None)
        self.mlp_norm = RMSNorm(cfg.base.hidden, cfg.base.eps)
        self.mlp = MoE(cfg, rank, world, group)


def build_moe(cfg: MoEConfig, rank, world, group, device) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg.base)
        model.layers = nn.ModuleDict({str(i): MoEBlock(cfg, rank, world, group) for i in range(cfg.base.layers)})
    model = model.to(torch.bfloat16)
    model.to_empty(device=device)
    init_weights(model, 0)  # the same replicated weights on every rank ...
    with torch.no_grad():  # ... and different experts
        gen = torch.Generator(device=device).manual_seed(1000 + rank)
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("w_gate", "w_up", "w_down") and ".mlp." in name:
                p.copy_(torch.randn(p.shape, generator=gen, device=device) * 0.02)
    return model


# --- context parallelism ----------------------------------------------------------------------
def zigzag_chunks(rank: int, cp: int) -> tuple[int, int]:
    return rank, 2 * cp - 1 - rank


class CPAttention(Attention):
    """Local queries of two zigzag chunks against all-gathered K/V (set ``cp_group``, ``cp_rank``)."""

    def forward(self, x, cos, sin):
        b, s, _ = x.shape  # s = 2 chunks of L tokens
        cp = dist.get_world_size(self.cp_group)
        L = s // 2
        q = F.linear(x, self.wq).view(b, s, self.nh, self.hd).transpose(1, 2)
        k = F.linear(x, self.wk).view(b, s, self.nkv, self.hd).transpose(1, 2)
        v = F.linear(x, self.wv).view(b, s, self.nkv, self.hd).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        kv = _GatherSeq.apply(torch.cat([k, v], dim=1), self.cp_group)  # [cp, b, 2·nkv, s, d]
        chunks = [None] * (2 * cp)
        for r in range(cp):
            a, c = zigzag_chunks(r, cp)
            chunks[a], chunks[c] = kv[r, :, :, :L], kv[r, :, :, L:]
        full = torch.cat(chunks, dim=2)  # [b, 2·nkv, S, d] in sequence order
        kf, vf = full[:, :self.nkv], full[:, self.nkv:]
        if not self.native_gqa and self.nkv != self.nh:
            kf = kf.repeat_interleave(self.nh // self.nkv, dim=1)
            vf = vf.repeat_interleave(self.nh // self.nkv, dim=1)
        outs = []
        if self.sdpa_backends is not None:
            from torch.nn.attention import sdpa_kernel

            ctx = sdpa_kernel(self.sdpa_backends)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            for i, ch in enumerate(zigzag_chunks(self.cp_rank, cp)):
                end = (ch + 1) * L
                outs.append(_causal_lower_right(q[:, :, i * L:(i + 1) * L], kf[:, :, :end].contiguous(),
                                                vf[:, :, :end].contiguous(), self.nkv != self.nh and self.native_gqa))
        o = torch.cat(outs, dim=2).transpose(1, 2).reshape(b, s, self.nh * self.hd)
        return F.linear(o, self.wo)


def _causal_lower_right(q, k, v, gqa: bool):
    """Causal attention of the last ``q.shape[2]`` positions of a ``k.shape[2]``-long sequence."""
    if q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if q.is_cuda:  # flash's causal mask is aligned to the lower right (FlashAttention 2)
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False,
                                                                   scale=1.0 / math.sqrt(q.shape[-1]))[0]
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                          enable_gqa=gqa)


class CPTransformer(Transformer):
    def forward(self, x):
        h = self.embed(x)
        cos, sin = self.rope(self.full_seq, h.device, h.dtype)
        cos, sin = cos.index_select(0, self.positions), sin.index_select(0, self.positions)
        for blk in self.layers.values():
            h = blk(h, cos, sin)
        return self.lm_head(self.norm(h))


def build_cp(cfg: LlamaConfig, rank, cp, group, seq, device) -> CPTransformer:
    model = _steps._build(cfg, device, 0)
    model.__class__ = CPTransformer
    L = seq // (2 * cp)
    model.full_seq = seq
    model.positions = torch.cat([torch.arange(c * L, (c + 1) * L) for c in zigzag_chunks(rank, cp)]).to(device)
    for blk in model.layers.values():
        blk.attn.__class__ = CPAttention
        blk.attn.cp_group, blk.attn.cp_rank = group, rank
    return model


def _cp_probe(model, device) -> str:
    """Check that the lower-right flash call takes grouped K/V natively; else repeat them."""
    name = pick_attention(model, device)
    if device.type != "cuda":
        return name
    q = torch.randn(1, 4, 64, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(1, 2, 128, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    try:
        _causal_lower_right(q, kv, kv, True).sum().backward()
        return name
    except RuntimeError:
        model.set_attention(False, None)
        for blk in model.layers.values():
            blk.attn.native_gqa = False
        return "flash-repeat_kv"


# --- one case (inside _worker, process group initialised) ------------------------------------
def build_dist_step(case: dict, rank: int, world: int, device: torch.device):
    """``(step, extra)`` of one case on this rank: ``step(i)`` runs training step ``i``; ``extra``
    holds the row's descriptive columns (parameters, world size, attention kernel, optimizer)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    group = dist.group.WORLD
    mb, seq, strategy = case["micro_batch"], case["seq_len"], case["strategy"]
    ddp_kw = {"device_ids": [device.index] if device.type == "cuda" else None}
    if strategy == "ep":
        cfg = MoEConfig.named(case["model"])
        extra = {"n_params": cfg.n_params(), "world_size": world}
        inner = build_moe(cfg, rank, world, group, device)
        extra["attn_impl"] = pick_attention(inner, device)
        experts = [n for n, _ in inner.named_parameters() if n.split(".")[-1] in ("w_gate", "w_up", "w_down")
                   and ".mlp." in n]
        DDP._set_params_and_buffers_to_ignore_for_model(inner, experts)  # expert grads stay local
        model = DDP(inner, **ddp_kw)
        data = _steps._batches(cfg.base, mb, seq, 2, device, 10 + rank)  # different tokens per rank
    elif strategy == "cp":
        cfg = LlamaConfig.named(case["model"])
        extra = {"n_params": cfg.n_params(), "world_size": world}
        inner = build_cp(cfg, rank, world, group, seq, device)
        extra["attn_impl"] = _cp_probe(inner, device)
        model = DDP(inner, **ddp_kw)
        full = _steps._batches(cfg, mb, seq, 2, device, 10)  # the same sequences on every rank ...
        pos = inner.positions
        data = [(x.index_select(1, pos), y.index_select(1, pos)) for x, y in full]  # ... its chunks
    else:
        raise ValueError(f"parallel2: unknown strategy {strategy}")
    opt, extra["optimizer"] = _steps._optimizer(model.parameters(), device)
    return _steps._train_step(model, opt, data, case["num_microbatches"], loss=inner.loss), extra


def run_dist_case(case: dict, rank: int, world: int, device: torch.device, quick: bool):
    step, extra = build_dist_step(case, rank, world, device)
    dist.barrier()
    try:
        return _steps.time_dist(case, step, device, quick, extra)
    finally:
        step = None  # noqa: F841  (the model, optimizer and data live in its closure)
        _steps._free(device)
        dist.barrier()
