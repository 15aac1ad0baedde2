"""Kernel time on one device: GEMM, flash attention, memory-bound ops, copies.

Every function is pure and accepts numpy arrays as well as scalars, so the planner can
evaluate thousands of shapes at once.  The forms are physical:

* GEMM: a roofline whose compute ceiling is the device's *achievable* dense rate, reduced
  by tile and wave quantization (NVIDIA, "Matrix Multiplication Background User's Guide")
  and by the fixed per-tile prologue/epilogue that short K loops cannot hide; memory ceiling
  is the M·K + K·N + M·N operand traffic at achievable HBM bandwidth; plus a fixed kernel cost.
* Flash attention: FlashAttention-2's grid of thread blocks (CTAs) dispatched greedily onto the
  SMs, each CTA's work its key columns (forward) or query rows (backward) plus a fixed
  per-CTA cost, at the device's attention rate (backward: 2.5× the forward's FLOPs per element,
  FlashAttention-2 §3).  Causal masking gives the CTAs unequal work, so a grid of few heads
  ends on a ragged last wave: that, not a constant factor, is what causal costs.
* Memory-bound ops: bytes moved at achievable HBM bandwidth plus a fixed kernel cost.

Calibration (``validation/``) moves predictions only through the device parameters used here.
"""
from __future__ import annotations

import functools
import heapq

import numpy as np

from plansim.simulator.hardware import Device
from plansim.workloads.ops import norm_bytes

DTYPE_BYTES = {"fp8": 1, "bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4}

#: defaults for the shape-efficiency parameters a calibrated profile may override
DEFAULT_GEMM_K_OVERHEAD = 64.0  # K elements' worth of per-tile fixed work (prologue/epilogue)
DEFAULT_ATTENTION_BWD_RATIO = 0.8  # backward FLOP rate relative to forward
#: fixed work per flash-attention CTA, in the units of its loop: the forward's in key columns
#: (load Q, rescale and write O), the backward's in query rows (load K and V, write dK and dV,
#: and its share of the dO·O and dQ-conversion kernels).  Calibration on H100 and H200 gives
#: ~100 and ~500 (hardware_profiles/calibrated/)
DEFAULT_ATTENTION_FWD_CTA_OVERHEAD = 128.0
DEFAULT_ATTENTION_BWD_CTA_OVERHEAD = 512.0
DEFAULT_ATTENTION_HEAD_DIM_HALF = 64.0  # FlashAttention-2: head dim 64 runs ~25% below 128
#: the backward kernels' rate beyond head dim 128 (``(128 / d) ** exponent``): they keep the dQ, dK
#: and dV blocks of a wider head in the same registers and shared memory, so they run smaller
#: tiles; 0 (no loss) where a device's attention was not measured at wider heads
DEFAULT_ATTENTION_BWD_WIDE_EXPONENT = 0.0
DEFAULT_UNALIGNED_GEMM_FRACTION = 0.15  # cuBLAS falls back to non-TMA kernels (16-byte rule)
#: an fp8 GEMM that promotes its partial sums to fp32 every few K steps ("split accumulator",
#: Transformer Engine's default for the dgrad and wgrad GEMMs; its fprop accumulates fast) runs
#: at this fraction of the fast-accumulating rate: 0.93-0.96 on large shapes, one H200
#: (validation/data/fp8-h200-x1, torch._scaled_mm use_fast_accum False vs True); calibration fits it
DEFAULT_FP8_SPLIT_ACCUMULATE_RATIO = 0.94
#: an fp8 GEMM's achievable share of the fp8 peak relative to a bf16 GEMM's of the bf16 peak: the
#: doubled tensor-core rate leaves operand feeding and epilogues a larger share (H200: ~0.77 of
#: the fp8 peak against ~0.80 of bf16's on large shapes, validation/data/fp8-h200-x1)
DEFAULT_FP8_GEMM_FRACTION = 0.97
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
#: torch's selective checkpointing (torchtitan's op-level AC, ``recompute = "selective-op"``) runs
#: every op of the checkpointed forward and of its recomputation through a Python
#: ``TorchDispatchMode`` (its policy, then its cache): on the host each pass costs this much more
#: than the plain forward's issue: 0.61–0.91 over six runs, median 0.71, of a tiny Llama stepped on
#: the CPU, where kernels take no time (``python benchmarks/sac_host_cost.py``, torch 2.13); the
#: H100 steps it bounds (validation/MEASURING.md, sacsteps) were never fitted to it.
SAC_DISPATCH_HOST_FACTOR = 0.71


#: FlashAttention-2's launch geometry as PyTorch SDPA's flash backend runs it on A100- and
#: H100-class GPUs, head dim <= 128 (Dao-AILab/flash-attention, flash_fwd_launch_template.h and
#: flash_bwd_launch_template.h; flash_fwd_kernel.h takes ``m_block = blockIdx.x``): the forward
#: gives each CTA 128 query rows of one (batch, head) and loops over the keys, launched in row
#: order, so under a causal mask the light rows go first; the backward gives each CTA 128 key
#: columns and loops over the queries, launched in column order, so the heavy ones go first.
#: Registers admit two forward CTAs (4 warps) and one backward CTA (8 warps) per SM.
FLASH_FWD_ROWS, FLASH_BWD_COLS = 128, 128
FLASH_FWD_CTAS_PER_SM, FLASH_BWD_CTAS_PER_SM = 2, 1
#: grids larger than this are simulated on their last CTAs only: the slots stay full until the
#: queue drains, so earlier heads add exactly their work divided by the slots
MAX_SIMULATED_CTAS = 1 << 14

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


def gemm_efficiency(m, n, k, device: Device, batch=1, dtype: str = "bf16"):
    """Fraction of the achievable GEMM rate ``batch`` independent (m, n, k) products reach (0 < e ≤ 1).

    A tile's prologue and epilogue take a fixed time, while its main loop runs through K at the
    tensor cores' rate for ``dtype``: ``gemm_k_overhead`` (K elements at the bf16 rate) is scaled
    by the dtype's rate over bf16's, so an fp8 GEMM of short K loses twice the fraction a bf16 one does."""
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
    k_overhead = _param(device, "gemm_k_overhead", DEFAULT_GEMM_K_OVERHEAD) * device.flops(dtype) / device.flops("bf16")
    k_eff = k / (k + k_overhead)
    return tile_eff * wave_eff * k_eff


def gemm_time(m, n, k, dtype: str, device: Device, batch=1, split_accumulate: bool = False):
    """Seconds for ``batch`` products C[m,n] = A[m,k]·B[k,n] in ``dtype`` on ``device`` (one
    kernel: attention's batched QKᵀ and ·V are ``batch`` = micro-batch × heads products, each
    with its own operands, so their traffic scales with the batch).  ``split_accumulate``: an fp8
    GEMM that promotes its sums to fp32 as it goes (``fp8_split_accumulate_ratio``); other dtypes
    accumulate in fp32 anyway.

    Row-major operands have leading dimensions K (of A) and N (of B and C); where either is not
    a multiple of 16 bytes the library cannot use its tensor-memory-accelerated kernels and
    runs at ``unaligned_gemm_fraction`` of the aligned rate (e.g. N = 50257, GPT-2's vocabulary).
    """
    m, n, k = (np.asarray(x, dtype=float) for x in (m, n, k))
    elem = DTYPE_BYTES[dtype]
    aligned = ((k * elem) % ALIGNMENT_BYTES == 0) & ((n * elem) % ALIGNMENT_BYTES == 0)
    penalty = np.where(aligned, 1.0, _param(device, "unaligned_gemm_fraction", DEFAULT_UNALIGNED_GEMM_FRACTION))
    batch = np.asarray(batch, dtype=float)
    if dtype == "fp8":
        penalty = penalty * _param(device, "fp8_gemm_fraction", DEFAULT_FP8_GEMM_FRACTION)
        if split_accumulate:
            penalty = penalty * _param(device, "fp8_split_accumulate_ratio", DEFAULT_FP8_SPLIT_ACCUMULATE_RATIO)
    rate = (device.flops(dtype) * device.achievable_gemm_fraction * gemm_efficiency(m, n, k, device, batch, dtype)
            * penalty)
    compute = 2.0 * batch * m * n * k / rate
    traffic = batch * (m * k + k * n + m * n) * DTYPE_BYTES[dtype] / device.achievable_hbm_bw_Bps
    return np.maximum(compute, traffic) + device.kernel_launch_s


def attention_flops(batch, heads, head_dim, seq_q, seq_kv, causal, phase: str, v_head_dim=None):
    """FLOPs a flash-attention kernel executes (not the MFU convention: causal skips tiles).
    Forward: QKᵀ at the query/key width, ·V at the value width (``v_head_dim``, default the
    same); backward: QKᵀ again, dV and dP at the value width, dQ and dK at the query/key width."""
    dv = head_dim if v_head_dim is None else v_head_dim
    width = {"forward": head_dim + dv, "backward": 3 * head_dim + 2 * dv, "both": 4 * head_dim + 3 * dv}[phase]
    fwd = 2.0 * np.asarray(batch, float) * heads * width * np.asarray(seq_q, float) * seq_kv
    if causal:
        # the mask is aligned to the bottom right (FlashAttention's, as _flash_phase_time has it):
        # seq_q queries against seq_kv ≥ seq_q keys see 1 − seq_q / (2·seq_kv) of the rectangle
        # (a half at seq_q = seq_kv; nearly all of it for a context-parallel rank's last chunk
        # against the whole sequence); tiles on the diagonal are computed in full: one band more
        sq, skv = np.asarray(seq_q, float), np.maximum(np.asarray(seq_kv, float), 1.0)
        fwd = fwd * (1.0 - np.minimum(sq, skv) / (2.0 * skv) + 64.0 / np.maximum(skv, 128.0))
    return fwd


@functools.lru_cache(maxsize=4096)
def flash_makespan(heads: int, works: tuple[float, ...], slots: int) -> float:
    """Finish time of a grid of ``heads`` × ``works`` CTAs (one ``works`` sequence per (batch,
    head), in launch order) dispatched greedily onto ``slots`` identical CTA slots: each CTA
    starts on the slot that frees first, as the GPU's block scheduler does."""
    per_head = float(sum(works))
    simulated = max(1, min(heads, MAX_SIMULATED_CTAS // max(len(works), 1)))
    free = [0.0] * slots
    for _ in range(simulated):
        for w in works:
            heapq.heapreplace(free, free[0] + w)
    return max(free) + (heads - simulated) * per_head / slots


def _flash_phase_time(heads: int, seq_q: int, seq_kv: int, head_dim: float, causal: bool, forward: bool,
                      rate: float, overhead: float, units: int, v_head_dim: float | None = None) -> float:
    """Seconds for one flash-attention kernel (forward or backward main kernel) over ``heads``
    (batch × heads) at ``rate`` FLOP/s for the whole device; ``v_head_dim``: value heads of
    another width than the query/key heads (their products are counted at their own widths)."""
    dv = head_dim if v_head_dim is None else v_head_dim
    offset = seq_kv - seq_q  # FlashAttention's causal mask is aligned to the bottom right
    if forward:
        blocks = -(-seq_q // FLASH_FWD_ROWS)
        span = [min(seq_kv, max(0, (i + 1) * FLASH_FWD_ROWS + offset)) if causal else seq_kv for i in range(blocks)]
        slots, flops_per_unit = FLASH_FWD_CTAS_PER_SM * units, 2.0 * FLASH_FWD_ROWS * (head_dim + dv)
    else:
        blocks = -(-seq_kv // FLASH_BWD_COLS)
        span = [max(0, seq_q - max(0, j * FLASH_BWD_COLS - offset)) if causal else seq_q for j in range(blocks)]
        slots, flops_per_unit = FLASH_BWD_CTAS_PER_SM * units, 2.0 * FLASH_BWD_COLS * (3 * head_dim + 2 * dv)
    works = tuple(float(w) + overhead for w in span)
    return flash_makespan(heads, works, slots) * flops_per_unit * slots / rate


def attention_param(device: Device, name: str, default: float, impl: str) -> float:
    """An ``attention_*`` parameter of the fused-attention kernels ``impl`` names (``default`` where
    the profile has none).  ``flash`` is FlashAttention-2 as PyTorch's SDPA runs it; ``cudnn`` is
    cuDNN's fused attention, which Transformer Engine (Megatron-Core) selects on Hopper and newer
    "for performance reasons" (TE's dot_product_attention/utils.py), 1.6-2.0× FlashAttention-2's
    rate on an H200 (validation/data/cudnnattention-h200-x1): the same cost model with its own
    fitted parameters, ``Device.cudnn_attention`` (the device's own where it has none)."""
    if impl == "cudnn" and device.cudnn_attention and name in device.cudnn_attention:
        return float(device.cudnn_attention[name])
    return float(device.attention_fraction) if name == "attention_fraction" else _param(device, name, default)


def _attention_time_scalar(batch, heads, kv_heads, head_dim, seq_q, seq_kv, causal, phase, device, dtype, impl,
                           v_head_dim=None):
    dv = head_dim if v_head_dim is None else v_head_dim
    d_half = attention_param(device, "attention_head_dim_half", DEFAULT_ATTENTION_HEAD_DIM_HALF, impl)
    mean = (head_dim + dv) / 2  # the tiles' rate, at the mean of the two widths
    head_dim_eff = (mean / (mean + d_half)) / (128.0 / (128.0 + d_half))  # 1 at head dim 128
    fwd_rate = device.flops(dtype) * attention_param(device, "attention_fraction", 0.0, impl) * head_dim_eff
    bwd_rate = fwd_rate * attention_param(device, "attention_bwd_ratio", DEFAULT_ATTENTION_BWD_RATIO, impl)
    if mean > 128:  # the backward's blocks (K, V, dK, dV, Q, dO) all scale with the two widths' sum
        bwd_rate *= (128.0 / mean) ** attention_param(device, "attention_bwd_wide_exponent",
                                                      DEFAULT_ATTENTION_BWD_WIDE_EXPONENT, impl)
    grid = int(batch * heads)
    sq, skv = int(seq_q), int(seq_kv)
    elem = DTYPE_BYTES[dtype]
    fwd_io = batch * (heads * sq + kv_heads * skv) * (head_dim + dv) * elem  # read Q, K, V; write O
    hbm = device.achievable_hbm_bw_Bps
    time = 0.0
    if phase in ("forward", "both"):
        compute = _flash_phase_time(grid, sq, skv, head_dim, causal, True, fwd_rate,
                                    attention_param(device, "attention_fwd_cta_overhead",
                                                     DEFAULT_ATTENTION_FWD_CTA_OVERHEAD, impl),
                                    device.compute_units, dv)
        time += max(compute, fwd_io / hbm) + device.kernel_launch_s
    if phase in ("backward", "both"):
        compute = _flash_phase_time(grid, sq, skv, head_dim, causal, False, bwd_rate,
                                    attention_param(device, "attention_bwd_cta_overhead",
                                                     DEFAULT_ATTENTION_BWD_CTA_OVERHEAD, impl),
                                    device.compute_units, dv)
        # read Q, K, V, O, dO; write dQ, dK, dV.  The backward also runs a dO·O preprocessing
        # kernel and a dQ conversion kernel
        time += max(compute, 2.0 * fwd_io / hbm) + 2 * device.kernel_launch_s
    return time


def attention_time(batch, heads, kv_heads, head_dim, seq_q, seq_kv, causal: bool, phase: str,
                   device: Device, dtype: str = "bf16", impl: str = "flash", v_head_dim=None):
    """Seconds for fused attention forward, backward or both: FlashAttention-2 as PyTorch SDPA's
    flash backend runs it, or cuDNN's (``impl``, workloads.plan.FUSED_ATTENTION); ``v_head_dim``:
    value heads of another width than the query/key heads (multi-head latent attention).

    The kernel's CTAs are placed on the SMs as the hardware does (``flash_makespan``), so the
    ragged last wave of a causal grid with few heads costs what it does on the GPU (measured on
    H100 and H200: b·h = 32 at 2,048 tokens runs causal at 82 % of the full mask's time for
    53 % of its work)."""
    shape = (batch, heads, kv_heads, head_dim, seq_q, seq_kv)
    if all(np.ndim(x) == 0 for x in shape):  # the simulator's case: one op at a time
        return _attention_time_scalar(*shape, bool(causal), phase, device, dtype, impl, v_head_dim)
    return np.vectorize(_attention_time_scalar, excluded={"causal", "phase", "device", "dtype", "impl", "v_head_dim"},
                        otypes=[float])(*shape, causal=bool(causal), phase=phase, device=device, dtype=dtype,
                                        impl=impl, v_head_dim=v_head_dim)


def context_parallel_attention_time(batch, heads, kv_heads, head_dim, seq_local, seq_total, causal: bool,
                                    phase: str, device: Device, dtype: str = "bf16", impl: str = "flash",
                                    v_head_dim=None):
    """Seconds for one context-parallel rank's flash attention: ``seq_local`` queries against
    ``seq_total`` keys.  Under a causal mask the sequence is cut into 2·cp chunks and rank r
    keeps chunks r and 2·cp − 1 − r (Megatron-LM's and Llama 3's load balancing), so every rank
    does the same work; rank 0's two kernels are costed: its first chunk against itself, its
    last chunk against the whole sequence (the mask aligned to the lower right)."""
    if not causal or seq_local >= seq_total:
        return attention_time(batch, heads, kv_heads, head_dim, seq_local, seq_total, causal, phase, device, dtype,
                              impl, v_head_dim)
    chunk = seq_local // 2
    return (attention_time(batch, heads, kv_heads, head_dim, chunk, chunk, True, phase, device, dtype, impl,
                           v_head_dim)
            + attention_time(batch, heads, kv_heads, head_dim, seq_local - chunk, seq_total, True, phase, device,
                             dtype, impl, v_head_dim))


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
