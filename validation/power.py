"""What the board power limit does to sustained throughput, read from the ``power`` suite's data.

``python -m plansim.validation.power [DIR]`` prints one row per phase of ``power.csv``
(``validation/runner/power.py`` measured it): the first and the last seconds of each phase,
their GEMM rate, HBM rate or step time, board power, SM clock, temperature and how often the
power cap was active.  It answers two questions the cost models depend on:

* do short measurements (the ``kernels`` and ``steps`` suites: a few seconds) see the clocks a
  training run of hours sees? — compare a phase's first seconds with its last;
* how far does a dense stream of tensor-core work fall below the short-burst GEMM rate, as a
  function of the share of time the tensor cores are busy (the ``mix-U`` phases)?

``fit_power`` turns the synthetic phases (``gemm``, ``hbm``, ``mix-U``, and the ``powerkernels``
streams where measured) into the parameters of ``simulator/costs/power.py``; the ``step-*``
phases and the steps suites are never fitted: they are the held-out check (``plansim calibrate``
writes the parameters into the calibrated profile).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from plansim.simulator.costs import compute

GEMM_N = 8192  # the power suite's GEMM (validation/runner/power.py)
DEFAULT_DIR = Path(__file__).resolve().parent / "data" / "h100-x1" / "power"
EDGE_S = 5.0  # seconds at the start and at the end of a phase that are compared
SETTLE_S = 5.0  # a phase's first seconds, while the power controller settles, are not fitted
KERNEL_SETTLE_S = 1.0  # a powerkernels stream's first second is not fitted
IDLE_QUANTILE = 0.01  # idle draw: the lowest samples, taken in the gaps between phases
DUTY_CAPPED = 0.97  # powerduty windows drawing at least this share of the limit are held by it


def load_power(data_dir: Path = DEFAULT_DIR, name: str = "power.csv") -> pd.DataFrame:
    """``power.csv`` (or another file of the power suites' columns) of a measurement folder, with
    the phase's own clock (seconds since it began)."""
    frame = pd.read_csv(Path(data_dir) / name)
    frame["t_phase_s"] = frame["t_start_s"] - frame.groupby("phase", sort=False)["t_start_s"].transform("min")
    return frame


def summarize_power(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per phase: its first and last ``EDGE_S`` seconds side by side."""
    rows = []
    for phase, g in frame.groupby("phase", sort=False):
        end = g["t_phase_s"].max()
        first, last = g[g["t_phase_s"] <= EDGE_S], g[g["t_phase_s"] >= end - EDGE_S]
        row = {"phase": phase, "seconds": round(end + g["duration_s"].iloc[-1], 1),
               "tensor_busy": g["gemm_s"].sum() / g["duration_s"].sum() if g["gemm_s"].notna().any() else None}
        for label, part in (("first", first), ("last", last)):
            for col in ("tflops", "gbps", "step_time_s", "power_w", "sm_clock_mhz", "temperature_c",
                        "power_cap_active"):
                values = part[col].dropna()
                row[f"{col}_{label}"] = float(values.mean()) if len(values) else None
        rows.append(row)
    return pd.DataFrame(rows)


def _synthetic(frame: pd.DataFrame) -> pd.DataFrame:
    """The settled windows of the calibration phases (GEMM stream, HBM stream, duty-cycle loops)."""
    fit = frame["phase"].eq("gemm") | frame["phase"].eq("hbm") | frame["phase"].str.startswith("mix-")
    return frame[fit & (frame["t_phase_s"] >= SETTLE_S)]


def fits_own_draws(data_dir: Path) -> bool:
    """Whether a power folder has the ``powerduty`` and ``powerkernels`` runs that ``fit_power``
    takes γ and the static share from (else they come from a GPU of the same die)."""
    return all((Path(data_dir) / f"{name}.csv").is_file() for name in ("power_duty", "power_kernels"))


def fit_power(data_dir: Path, device, shared: dict[str, float] | None = None) -> tuple[dict[str, float], dict[str, dict]]:
    """The power-model parameters of ``simulator/costs/power.py`` from a ``power`` suite folder
    (and its ``powerduty`` and ``powerkernels`` runs, where measured), and the fit's residuals.
    ``device`` (calibrated, not throttled) gives each kernel's short-sample time.

    * idle: the lowest sampled draw (the gaps between phases, a process attached);
    * γ: the GEMM stream and the ``powerduty`` phases (one GEMM, then idle, in ~2 ms periods:
      one clock per phase) that the limit holds: a GEMM's draw, (draw − idle) / GEMM share,
      against the clock is a line in logs, of slope γ;
    * tensor and static share: every ``powerkernels`` tensor stream sits at the power limit at
      its own clock φ; its draw above idle over φ^γ is ``w_s + w_f · u`` (``u`` its short-sample
      FLOP rate over the achievable GEMM rate), a line in ``u``: ``tensor_w = w_s + w_f`` and
      ``a = w_s / tensor_w``;
    * burst: the GEMM stream's TFLOP/s per MHz puts the short-sample GEMM rate at a clock φ_s;
      the draw there, ``idle + W · φ_s^γ``, is what a short burst is held to;
    * memory: the HBM stream's draw above idle over φ^γ.

    A folder without ``powerduty`` or ``powerkernels`` runs takes γ and ``a`` from ``shared``
    (a GPU of the same die) and ``tensor_w`` from its GEMM stream; without ``shared`` it gives
    only the idle draw.
    """
    data_dir = Path(data_dir)
    frame = _synthetic(load_power(data_dir))
    samples = pd.read_csv(data_dir / "power_samples.csv", skipinitialspace=True)
    idle = float(pd.to_numeric(samples["power.draw"], errors="coerce").quantile(IDLE_QUANTILE))
    hbm = frame[frame["phase"] == "hbm"]
    f_max = float(hbm["sm_clock_mhz"].max())
    gemm = frame[frame["phase"] == "gemm"]
    t_short = float(compute.gemm_time(GEMM_N, GEMM_N, GEMM_N, "bf16", device))
    u_gemm = min(1.0, 2.0 * GEMM_N ** 3 / (device.flops("bf16") * device.achievable_gemm_fraction) / t_short)

    def gemm_share(static: float) -> float:
        """The power suite's GEMM's draw as a share of ``tensor_w`` (costs/power.py, PowerModel.draw_w)."""
        return static + (1 - static) * u_gemm
    stats: dict[str, dict] = {}
    if fits_own_draws(data_dir):
        gamma, stats["gemm draw against clock"] = _fit_clock_exponent(gemm, load_power(data_dir, "power_duty.csv"),
                                                                     idle, f_max, device.power_limit_w)
        tensor = _settled_tensor_streams(pd.read_csv(data_dir / "power_kernels.csv"))
        u = _utilization(tensor, device)
        clock = tensor["sm_clock_mhz"].to_numpy() / f_max
        w_s, w_f, res = _line_fit(u, (tensor["power_w"].to_numpy() - idle) / clock ** gamma)
        tensor_w, static = w_s + w_f, w_s / (w_s + w_f)
        stats["tensor power by kernel"] = _residuals(res)
    elif shared:
        gamma, static = shared["power_clock_exponent"], shared["tensor_static_fraction"]
        draw = float(((gemm["power_w"] - idle) / (gemm["sm_clock_mhz"] / f_max) ** gamma).median())
        tensor_w = draw / gemm_share(static)
    else:
        return {"idle_power_w": idle}, stats
    per_mhz = float((gemm["tflops"] / gemm["sm_clock_mhz"]).median())
    short_clock = min(1.0, 2.0 * GEMM_N ** 3 / t_short / 1e12 / per_mhz / f_max)
    burst = idle + tensor_w * gemm_share(static) * short_clock ** gamma
    memory = float(((hbm["power_w"] - idle) / (hbm["sm_clock_mhz"] / f_max) ** gamma).median())
    params = {"idle_power_w": idle, "burst_power_w": burst, "tensor_power_w": tensor_w,
              "tensor_static_fraction": static, "memory_power_w": memory, "power_clock_exponent": gamma}
    return params, stats


def _fit_clock_exponent(gemm: pd.DataFrame, duty: pd.DataFrame, idle: float, f_max: float,
                        limit: float) -> tuple[float, dict]:
    """γ from the GEMM stream and the ``powerduty`` windows the limit holds (their clock is one
    clock: the period is far below the controller's averaging): log GEMM draw against log clock."""
    duty = duty[(duty["t_phase_s"] >= SETTLE_S) & (duty["power_w"] >= DUTY_CAPPED * limit)]
    windows = pd.concat([gemm, duty], ignore_index=True)
    share = (windows["gemm_s"] / windows["duration_s"]).to_numpy()
    clock = windows["sm_clock_mhz"].to_numpy() / f_max
    draw = (windows["power_w"].to_numpy() - idle) / share
    gamma, log_w = np.polyfit(np.log(clock), np.log(draw), 1)
    res = np.exp(log_w) * clock ** gamma / draw - 1.0
    return float(gamma), _residuals(res)


def _settled_tensor_streams(kernels: pd.DataFrame) -> pd.DataFrame:
    tensor = kernels[kernels["kind"] == "tensor"].copy()
    tensor["t_phase_s"] = tensor["t_start_s"] - tensor.groupby("phase")["t_start_s"].transform("min")
    return tensor[tensor["t_phase_s"] >= KERNEL_SETTLE_S]


def _utilization(tensor: pd.DataFrame, device) -> np.ndarray:
    """Each stream's short-sample FLOP rate over the device's achievable GEMM rate (≤ 1)."""
    reference = device.flops("bf16") * device.achievable_gemm_fraction
    short = {phase: kernel_short_sample(phase, device) for phase in tensor["phase"].unique()}
    seconds = tensor["phase"].map(lambda p: short[p][0]).to_numpy()
    flops = tensor["phase"].map(lambda p: short[p][1]).to_numpy()
    return np.minimum(1.0, flops / reference / seconds)


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Least-squares ``y = a + b·x``: (a, b, relative residuals)."""
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b), (a + b * x) / y - 1.0


def _residuals(res: np.ndarray) -> dict:
    return {"windows": int(len(res)), "median_abs_error": float(np.median(np.abs(res))),
            "p90_abs_error": float(np.quantile(np.abs(res), 0.9))}


_GEMM = re.compile(r"gemm-(?:fp8-(e4m3-fast|e5m2-e4m3)-)?m(\d+)-n(\d+)-k(\d+)$")
_ATTN = re.compile(r"attn-b(\d+)-h(\d+)-kv(\d+)-d(\d+)-s(\d+)-causal$")


def kernel_short_sample(phase: str, device) -> tuple[float, float]:
    """(short-sample seconds per call, FLOPs per call as the cost model counts them) of a
    ``powerkernels`` tensor phase, from its name."""
    if (g := _GEMM.match(phase)):
        fp8, (m, n, k) = g.group(1), map(int, g.groups()[1:])
        time = compute.gemm_time(m, n, k, "fp8" if fp8 else "bf16", device, split_accumulate=fp8 == "e5m2-e4m3")
        return float(time), 2.0 * m * n * k
    if (a := _ATTN.match(phase)):
        b, h, kv, d, seq = map(int, a.groups())
        time = float(compute.attention_time(b, h, kv, d, seq, seq, True, "both", device))
        return time, float(compute.attention_flops(b, h, d, seq, seq, True, "both"))
    raise ValueError(f"phase: {phase!r} is not a powerkernels tensor phase (gemm-m…-n…-k… or attn-b…-h…-kv…-d…-s…-causal)")


_STEP_CASE = re.compile(r"step-(?P<model>.+)-single-tp1-pp1-dp1-mb(?P<mb>\d+)-nmb(?P<nmb>\d+)-s(?P<seq>\d+)-rc(?P<rc>\w+)$")


def step_clocks(data_dir: Path, cluster) -> pd.DataFrame:
    """The power suites' step phases (``power.csv`` and ``power_steps.csv``; never fitted): each
    step's sustained SM clock as measured
    (the mean of its last ``EDGE_S`` seconds) and as ``plansim simulate`` predicts it on
    ``cluster`` (calibrated, one GPU)."""
    from plansim.simulator.engine import TrainingSimulation
    from plansim.validation.compare import CONFIGS_DIR, step_plan
    from plansim.workloads.model_io import load_model
    from plansim.workloads.training import TrainingWorkload

    power = load_power(data_dir)
    f_max = float(power.query("phase == 'hbm'")["sm_clock_mhz"].max())
    frames = [power] + ([load_power(data_dir, "power_steps.csv")]
                        if (Path(data_dir) / "power_steps.csv").is_file() else [])
    summary = pd.concat([summarize_power(f) for f in frames], ignore_index=True)
    rows = []
    for _, phase in summary[summary["phase"].str.startswith("step-")].iterrows():
        case = _STEP_CASE.match(phase["phase"]).groupdict()
        mb, nmb = int(case["mb"]), int(case["nmb"])
        plan = step_plan({"model": case["model"], "strategy": "single", "tp": 1, "pp": 1, "dp": 1, "micro_batch": mb,
                          "global_batch": mb * nmb, "seq_len": int(case["seq"]), "recompute": case["rc"],
                          "schedule": "-"})
        spec = load_model(CONFIGS_DIR / f"{case['model']}.json")
        output = TrainingSimulation(TrainingWorkload(spec, plan), cluster).run()
        rows.append({"phase": phase["phase"], "measured_mhz": phase["sm_clock_mhz_last"],
                     "predicted_mhz": (output.power.clock if output.power else 1.0) * f_max})
    frame = pd.DataFrame(rows)
    frame["error"] = frame["predicted_mhz"] / frame["measured_mhz"] - 1.0
    return frame


def fp8_stream_rates(data_dir: Path, device) -> pd.DataFrame:
    """The ``powerfp8`` suite (``power_fp8.csv``; never fitted): each GEMM stream's sustained
    TFLOP/s against the power model's.  The model caps a tensor kernel's draw at a large bf16
    GEMM's (``PowerModel.draw_w``), so an fp8 GEMM at twice the FLOP rate is held to the same
    clock: this is the check of that."""
    from plansim.simulator.costs.power import Activity, PowerModel

    power = PowerModel.of(device)
    tensor = _settled_tensor_streams(pd.read_csv(Path(data_dir) / "power_fp8.csv"))
    rows = []
    for phase, part in tensor.groupby("phase", sort=False):
        seconds, flops = kernel_short_sample(phase, device)
        state = power.state(Activity.of(device, (seconds, flops, 0.0, 0.0), seconds, seconds))
        rows.append({"phase": phase, "short_tflops": flops / seconds / 1e12,
                     "measured_tflops": float(part["tflops"].median()),
                     "predicted_tflops": flops / (seconds * state.slowdowns[0]) / 1e12,
                     "sm_clock_mhz": float(part["sm_clock_mhz"].median()), "power_w": float(part["power_w"].median())})
    out = pd.DataFrame(rows)
    out["error"] = out["predicted_tflops"] / out["measured_tflops"] - 1.0
    return out


def stream_slowdowns(data_dir: Path, device) -> pd.DataFrame:
    """The ``powerstream`` suite (``power_stream.csv``; never fitted): per configuration whose
    short samples were measured, how much slower its GEMMs ran inside Vidur's layer stream than
    alone (GEMM-time weighted) against ``validation.vidur.stream_slowdown`` on ``device`` (the
    fully settled clock), with the sampled SM clock and board power."""
    from plansim.validation.vidur import stream_slowdown

    frame = pd.read_csv(Path(data_dir) / "power_stream.csv")
    rows = []
    for phase, part in frame.groupby("phase", sort=False):
        row = dict(part.iloc[0].to_dict(), use_gated_mlp=True)
        rows.append({"phase": phase, "stream_ms": 1e3 * row["duration_s"],
                     "measured": part["stream_s"].sum() / part["short_s"].sum(),
                     "predicted": stream_slowdown(row, device), "sm_clock_mhz": row.get("sm_clock_mhz"),
                     "power_w": row.get("power_w")})
    out = pd.DataFrame(rows)
    out["error"] = out["predicted"] / out["measured"] - 1.0
    return out


def main(argv: list[str] | None = None) -> int:
    from plansim.validation.compare import calibrated_cluster, rel

    args = sys.argv[1:] if argv is None else argv
    data_dir = Path(args[0]) if args else DEFAULT_DIR
    summary = summarize_power(load_power(data_dir))
    cols = ["phase", "seconds", "tensor_busy", "tflops_first", "tflops_last", "gbps_last", "step_time_s_first",
            "step_time_s_last", "power_w_last", "sm_clock_mhz_first", "sm_clock_mhz_last", "temperature_c_last",
            "power_cap_active_last"]
    fmt = {"index": False, "float_format": lambda v: f"{v:.4g}", "na_rep": "-"}
    print(summary[cols].to_string(**fmt))
    cluster, _ = calibrated_cluster(data_dir.parent)
    print("\nsustained SM clock of the step phases (held out: never fitted), MHz")
    print(step_clocks(data_dir, cluster.model_copy(update={"nodes": 1, "gpus_per_node": 1})).to_string(**fmt))
    # later runs of the same card sit beside the power folder, each with its own provenance
    for folder in (data_dir, data_dir.parent / "powerstream"):
        if (folder / "power_stream.csv").is_file():
            print(f"\nGEMMs in Vidur's layer stream against short samples ({rel(folder)}; held out: never fitted), "
                  "time ratio")
            print(stream_slowdowns(folder, cluster.device).to_string(**fmt))
    if (data_dir.parent / "powerfp8" / "power_fp8.csv").is_file():
        print("\nfp8 and bf16 GEMM streams at the power limit (held out: never fitted), TFLOP/s")
        print(fp8_stream_rates(data_dir.parent / "powerfp8", cluster.device).to_string(**fmt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
