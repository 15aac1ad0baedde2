"""Hand-written pipeline schedules (GPipe, 1F1B) with point-to-point send/recv.

Written after Megatron-LM's ``forward_backward_pipelining_without_interleaving``: combined
send-forward/receive-backward and send-backward/receive-forward exchanges through
``batch_isend_irecv``, so neighbouring stages never wait on each other's sends.  Each stage
holds the (input, output) of its micro-batches in flight: GPipe all ``m``; 1F1B at most
``p - stage`` (warm-up ``p - stage - 1`` plus one).  The loss on the last stage is divided by
``m``; gradients accumulate over the micro-batches; the optimizer step follows the schedule.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class StageRunner:
    def __init__(self, model, rank: int, pp: int, act_shape, dtype, device, group=None):
        self.model, self.rank, self.pp = model, rank, pp
        self.first, self.last = rank == 0, rank == pp - 1
        self.act_shape, self.dtype, self.device, self.group = act_shape, dtype, device, group

    # --- p2p ------------------------------------------------------------------------------
    def _empty(self):
        return torch.empty(self.act_shape, dtype=self.dtype, device=self.device)

    def _exchange(self, sends, recvs):
        ops = [dist.P2POp(dist.isend, t, peer, self.group) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, self.group) for t, peer in recvs]
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()

    def recv_fwd(self):
        if self.first:
            return None
        x = self._empty()
        self._exchange([], [(x, self.rank - 1)])
        return x

    def send_fwd(self, y):
        if not self.last:
            self._exchange([(y.detach(), self.rank + 1)], [])

    def recv_bwd(self):
        if self.last:
            return None
        g = self._empty()
        self._exchange([], [(g, self.rank + 1)])
        return g

    def send_bwd(self, g):
        if not self.first:
            self._exchange([(g, self.rank - 1)], [])

    def send_fwd_recv_bwd(self, y):
        if self.last:
            return None
        g = self._empty()
        self._exchange([(y.detach(), self.rank + 1)], [(g, self.rank + 1)])
        return g

    def send_bwd_recv_fwd(self, g):
        if self.first:
            return None
        x = self._empty()
        self._exchange([(g, self.rank - 1)], [(x, self.rank - 1)])
        return x

    # --- compute --------------------------------------------------------------------------
    def forward(self, x, tokens, target, m):
        if self.first:
            inp = tokens
        else:
            inp = x.requires_grad_(True)
        out = self.model(inp)
        if self.last:
            out = self.model.loss(out, target) / m
        return inp, out

    def backward(self, inp, out, g):
        if self.last:
            out.backward()
        else:
            torch.autograd.backward(out, grad_tensors=g)
        return None if self.first else inp.grad

    # --- schedules ------------------------------------------------------------------------
    def gpipe(self, tokens, targets):
        m = len(tokens)
        stash = []
        for i in range(m):
            x = self.recv_fwd()
            inp, out = self.forward(x, tokens[i], targets[i], m)
            self.send_fwd(out)
            stash.append((inp, out))
        for i in range(m):
            inp, out = stash[i]
            g = self.recv_bwd()
            self.send_bwd(self.backward(inp, out, g))
            stash[i] = None

    def one_f_one_b(self, tokens, targets):
        m = len(tokens)
        warmup = min(self.pp - self.rank - 1, m)
        remaining = m - warmup
        stash = []
        for i in range(warmup):
            x = self.recv_fwd()
            inp, out = self.forward(x, tokens[i], targets[i], m)
            self.send_fwd(out)
            stash.append((inp, out))
        x = self.recv_fwd() if remaining > 0 else None
        for i in range(remaining):
            k = warmup + i
            inp, out = self.forward(x, tokens[k], targets[k], m)
            stash.append((inp, out))
            g = self.send_fwd_recv_bwd(out)
            inp0, out0 = stash.pop(0)
            gin = self.backward(inp0, out0, g)
            if i == remaining - 1:
                self.send_bwd(gin)
            else:
                x = self.send_bwd_recv_fwd(gin)
        for _ in range(warmup):
            g = self.recv_bwd()
            inp0, out0 = stash.pop(0)
            self.send_bwd(self.backward(inp0, out0, g))
