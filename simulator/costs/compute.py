"""Kernel time on one device: GEMM, flash attention, memory-bound ops, copies.

Every function is pure and accepts numpy arrays as well as scalars, so the planner can
evaluate thousands of shapes at once.  The forms are physical:

* GEMM: a roofline whose compute ceiling is the device's *achievable* dense rate, reduced
  by tile and wave quantization (NVIDIA, "Matrix Multiplication Background User's Guide")
  and by the fixed per-tile prologue/epilogue that short K loops cannot hide; memory ceiling
  is the M·K + K·N + M·N operand traffic at achievable HBM bandwidth; plus a fixed kernel cost.
* Flash attention: executed FLOPs (causal masking skips about half the tiles; backward runs
  five matmuls against the forward's two, i.e. 2.5×, FlashAttention-2 §3) at the device's
  attention rate, which saturates with sequence length as tiles fill.
* Memory-bound ops: bytes moved at achievable HBM bandwidth plus a fixed kernel cost.

Calibration (``validation/``) moves predictions only through the device parameters used here.
"""
from __future__ import annotations

import numpy as np

from plansim.simulator.hardware import Device
from plansim.workloads.ops import norm_bytes

DTYPE_BYTES = {"fp8": 1, "bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4}

#: defaults for the shape-efficiency parameters a calibrated profile may override
DEFAULT_GEMM_K_OVERHEAD = 64.0  # K elements' worth of per-tile fixed work (prologue/epilogue)
DEFAULT_ATTENTION_SEQ_HALF = 256.0  # sequence length at which attention reaches half its rate
DEFAULT_ATTENTION_BWD_RATIO = 0.8  # backward FLOP rate relative to forward
DEFAULT_ATTENTION_CAUSAL_EFFICIENCY = 0.8  # diagonal tiles are masked and row blocks unequal
DEFAULT_ATTENTION_HEAD_DIM_HALF = 64.0  # FlashAttention-2: head dim 64 runs ~25% below 128
DEFAULT_UNALIGNED_GEMM_FRACTION = 0.15  # cuBLAS falls back to non-TMA kernels (16-byte rule)
DEFAULT_NORM_BANDWIDTH_FRACTION = 0.75  # norm kernels vs a streaming elementwise op
#: a collective hidden behind compute still costs this fraction of its own time: NCCL's kernels
#: hold SMs and HBM bandwidth the GEMMs beside them would use.  Median over the calibration split
#: of the pairs of 32 MiB and more measured on 2×H200 (validation/data/h200-x2/overlap: one
#: collective beside the GEMMs of about its length, Megatron's pattern; all pairs 0.09-0.69);
#: the held-out pairs are predicted within 7 % (tests/validation/test_overlap_data.py)
DEFAULT_OVERLAP_CONTENTION = 0.50
#: the per-GPU traffic rate of those pairs (median bus bandwidth of the same calibration half,
#: NVLink 4): a collective moving bytes more slowly (over a NIC) holds fewer SMs and less HBM
#: bandwidth per second, so its contention is scaled down by its rate over this one
OVERLAP_REFERENCE_BPS = 236e9
ALIGNMENT_BYTES = 16  # leading dimensions must be multiples of 16 bytes for tensor-core kernels
#: host seconds to issue one kernel from eager PyTorch (Python, dispatcher, autograd, launch):
#: the median over forward and backward of shrunk Llama and GPT models that leave the GPU idle,
#: 19-27 µs on the 2×H200 machine's Xeon (validation/data/h200-x2/profile/host.csv; 30-64 µs on
#: the H100 machines' slower VMs).  Host speed belongs to the machine, not the GPU: a device
#: profile may set its host's figure as ``kernel_issue_s``.
DEFAULT_KERNEL_ISSUE_S = 22e-6


MIN_GEMM_TILE = 64.0  # smallest CTA tile edge cuBLAS/CUTLASS use for a short GEMM dimension


def _next_pow2(x):
    return np.exp2(np.ceil(np.log2(np.maximum(x, 1.0))))


def _param(device: Device, name: str, default: float) -> float:
    value = getattr(device, name, None)
    return default if value is None else float(value)


def overlap_contention(device: Device) -> float:
    """The fraction of a hidden collective's time that overlapping does not save, at the rate
    it was measured (NVLink)."""
    return _param(device, "overlap_contention", DEFAULT_OVERLAP_CONTENTION)


def contention_s(device: Device, overlap_s: float, bytes_moved: float) -> float:
    """Compute time lost to a collective that moved ``bytes_moved`` over its link during
    ``overlap_s`` of compute: the measured fraction of that time, or less in proportion to the
    bytes when they moved more slowly than in the measurement (a NIC-bound collective holds fewer
    SMs and less HBM bandwidth per second; an assumption, measured on NVLink only)."""
    return overlap_contention(device) * min(overlap_s, bytes_moved / OVERLAP_REFERENCE_BPS)


def gemm_efficiency(m, n, k, device: Device, batch=1):
    """Fraction of the achievable GEMM rate ``batch`` independent (m, n, k) products reach (0 < e ≤ 1)."""
    m, n, k = (np.asarray(x, dtype=float) for x in (m, n, k))
    # libraries carry smaller tile shapes for skinny problems (cuBLAS/CUTLASS heuristics pick the
    # smallest tile that covers a short dimension, down to MIN_GEMM_TILE): a decode GEMM with
    # m = 1 is not charged a full 128- or 256-row tile
    tm = np.minimum(float(device.gemm_tile_m), np.maximum(MIN_GEMM_TILE, _next_pow2(m)))
    tn = np.minimum(float(device.gemm_tile_n), np.maximum(MIN_GEMM_TILE, _next_pow2(n)))
    tiles_m, tiles_n = np.ceil(m / tm), np.ceil(n / tn)
    tile_eff = (m * n) / (tiles_m * tm * tiles_n * tn)
    tiles = tiles_m * tiles_n * np.asarray(batch, dtype=float)
    units = float(device.compute_units)
    wave_eff = tiles / (np.ceil(tiles / units) * units)
    # libraries split K over idle units when there are fewer tiles than units (split-K /
    # stream-K), which recovers part of a partial wave: never below the split-K bound.
    split_k = np.minimum(np.floor(units / tiles), np.maximum(k / 256.0, 1.0))
    wave_eff = np.maximum(wave_eff, np.minimum(1.0, tiles * np.maximum(split_k, 1.0) / units))
    k_eff = k / (k + _param(device, "gemm_k_overhead", DEFAULT_GEMM_K_OVERHEAD))
    return tile_eff * wave_eff * k_eff


def gemm_time(m, n, k, dtype: str, device: Device, batch=1):
    """Seconds for ``batch`` products C[m,n] = A[m,k]·B[k,n] in ``dtype`` on ``device`` (one
    kernel: attention's batched QKᵀ and ·V are ``batch`` = micro-batch × heads products, each
    with its own operands, so their traffic scales with the batch).

    Row-major operands have leading dimensions K (of A) and N (of B and C); where either is not
    a multiple of 16 bytes the library cannot use its tensor-memory-accelerated kernels and
    runs at ``unaligned_gemm_fraction`` of the aligned rate (e.g. N = 50257, GPT-2's vocabulary).
    """
    m, n, k = (np.asarray(x, dtype=float) for x in (m, n, k))
    elem = DTYPE_BYTES[dtype]
    aligned = ((k * elem) % ALIGNMENT_BYTES == 0) & ((n * elem) % ALIGNMENT_BYTES == 0)
    penalty = np.where(aligned, 1.0, _param(device, "unaligned_gemm_fraction", DEFAULT_UNALIGNED_GEMM_FRACTION))
    batch = np.asarray(batch, dtype=float)
    rate = (device.flops(dtype) * device.achievable_gemm_fraction * gemm_efficiency(m, n, k, device, batch)
            * penalty)
    compute = 2.0 * batch * m * n * k / rate
    traffic = batch * (m * k + k * n + m * n) * DTYPE_BYTES[dtype] / device.achievable_hbm_bw_Bps
    return np.maximum(compute, traffic) + device.kernel_launch_s


def attention_flops(batch, heads, head_dim, seq_q, seq_kv, causal, phase: str):
    """FLOPs a flash-attention kernel executes (not the MFU convention: causal skips tiles)."""
    fwd = 4.0 * np.asarray(batch, float) * heads * head_dim * np.asarray(seq_q, float) * seq_kv
    if causal:
        # tiles on the diagonal are computed in full: about half plus one diagonal band
        fwd = fwd * (0.5 + 64.0 / np.maximum(np.asarray(seq_kv, float), 128.0))
    factor = {"forward": 1.0, "backward": 2.5, "both": 3.5}[phase]
    return fwd * factor


def attention_time(batch, heads, kv_heads, head_dim, seq_q, seq_kv, causal: bool, phase: str,
                   device: Device, dtype: str = "bf16"):
    """Seconds for flash attention (PyTorch SDPA's flash backend) forward, backward or both."""
    seq_kv_arr = np.asarray(seq_kv, float)
    saturation = seq_kv_arr / (seq_kv_arr + _param(device, "attention_seq_half", DEFAULT_ATTENTION_SEQ_HALF))
    d_half = _param(device, "attention_head_dim_half", DEFAULT_ATTENTION_HEAD_DIM_HALF)
    head_dim_eff = (head_dim / (head_dim + d_half)) / (128.0 / (128.0 + d_half))  # 1 at head dim 128
    causal_eff = _param(device, "attention_causal_efficiency", DEFAULT_ATTENTION_CAUSAL_EFFICIENCY) if causal else 1.0
    fwd_rate = device.flops(dtype) * device.attention_fraction * saturation * head_dim_eff * causal_eff
    bwd_rate = fwd_rate * _param(device, "attention_bwd_ratio", DEFAULT_ATTENTION_BWD_RATIO)
    elem = DTYPE_BYTES[dtype]
    q_bytes = np.asarray(batch, float) * heads * seq_q * head_dim * elem
    kv_bytes = 2.0 * np.asarray(batch, float) * kv_heads * seq_kv_arr * head_dim * elem
    fwd_io = 2.0 * q_bytes + kv_bytes  # read Q, K, V; write O
    time = 0.0
    if phase in ("forward", "both"):
        flops = attention_flops(batch, heads, head_dim, seq_q, seq_kv, causal, "forward")
        time = time + np.maximum(flops / fwd_rate, fwd_io / device.achievable_hbm_bw_Bps) + device.kernel_launch_s
    if phase in ("backward", "both"):
        flops = attention_flops(batch, heads, head_dim, seq_q, seq_kv, causal, "backward")
        bwd_io = 2.0 * fwd_io  # read Q, K, V, O, dO; write dQ, dK, dV
        # the backward runs a preprocessing kernel (dO·O row sums) and the main kernel
        time = time + np.maximum(flops / bwd_rate, bwd_io / device.achievable_hbm_bw_Bps) + 2 * device.kernel_launch_s
    return time


def kernel_issue_time(kernels, device: Device):
    """Host seconds to issue ``kernels`` eager kernels: a GPU cannot run work faster than its
    host hands it over, so small kernels leave it idle (launch-bound steps)."""
    return np.asarray(kernels, float) * _param(device, "kernel_issue_s", DEFAULT_KERNEL_ISSUE_S)


def memory_bound_time(bytes_moved, device: Device, sm_rate_Bps: float = 0.0):
    """Seconds for a kernel limited by HBM traffic (bytes read + bytes written), or by the SMs
    where ``sm_rate_Bps`` (bytes/s each SM's share of the kernel moves) gives the lower rate."""
    bandwidth = device.achievable_hbm_bw_Bps
    if sm_rate_Bps:
        bandwidth = min(bandwidth, sm_rate_Bps * device.compute_units)
    return np.asarray(bytes_moved, float) / bandwidth + device.kernel_launch_s


def norm_time(tokens, hidden, device: Device, dtype: str = "bf16", bytes_moved=None):
    """Seconds for a RMSNorm/LayerNorm (forward: ``norm_bytes``; or ``bytes_moved`` given):
    a row reduction before any write keeps it below streaming bandwidth."""
    moved = norm_bytes(tokens, hidden, dtype) if bytes_moved is None else bytes_moved
    fraction = _param(device, "norm_bandwidth_fraction", DEFAULT_NORM_BANDWIDTH_FRACTION)
    return np.asarray(moved, float) / (device.achievable_hbm_bw_Bps * fraction) + device.kernel_launch_s


def memcpy_time(nbytes, device: Device):
    """Device-to-device copy of ``nbytes``: read once, write once."""
    return memory_bound_time(2.0 * np.asarray(nbytes, float), device)


def elementwise_time(nbytes, device: Device):
    """Binary elementwise op with ``nbytes`` operands: two reads and one write."""
    return memory_bound_time(3.0 * np.asarray(nbytes, float), device)


def roofline_time(flops, bytes_moved, device: Device, dtype: str = "bf16"):
    """Lower bound at datasheet peaks: no kernel can beat it (used by the invariant tests)."""
    return np.maximum(np.asarray(flops, float) / device.flops(dtype),
                      np.asarray(bytes_moved, float) / device.hbm_bw_Bps)
