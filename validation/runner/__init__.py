"""plansim.validation.runner: measure kernels, transfers, collectives and training steps on GPUs.

The only place in plansim that imports torch, and only inside the functions that need it, so
``import plansim.validation.runner`` works without torch.  Entry points:
``measure(suite, out_dir, quick=False)`` and ``python -m plansim.validation.runner``
(or ``python3 validation/runner/__main__.py`` from a checkout).  See validation/MEASURING.md.
"""
from __future__ import annotations

import os
import time

from plansim.validation.runner.common import SUITES, split_for, write_csv  # noqa: F401

__all__ = ["measure", "SUITES", "EXTRA_SUITES", "split_for"]

#: suites run only when named (not part of ``all``): suite -> {csv name: columns of that suite}
EXTRA_SUITES = {"gpt2021": {"kernels_gpt": "kernels", "steps_gpt": "steps"},
                "parallel2": {"steps_parallel2": "steps"}, "power": {"power": "power"},
                "powerkernels": {"power_kernels": "power"}, "powersteps": {"power_steps": "power"},
                "powerduty": {"power_duty": "power"}, "powergaps": {"power_gaps": "power"},
                "powerstream": {"power_stream": "power"}, "powerfp8": {"power_fp8": "power"},
                "overlap": {"overlap": "overlap"}, "profile": {"profile": "profile"},
                "attention": {"kernels": "kernels"}, "cudnnattention": {"kernels": "kernels"},
                "mlaattention": {"kernels": "kernels"}, "headdims": {"kernels": "kernels"},
                "fp8": {"kernels": "kernels"}, "bigsteps": {"steps": "steps"}, "cudnnsteps": {"steps": "steps"},
                "sacsteps": {"steps": "steps"},
                "fsdp1": {"steps": "steps", "profile": "profile"}, "bigprofile": {"profile": "profile"}}

#: suites that time CUDA kernels, events or clocks and so cannot run on the CPU at all
CUDA_ONLY = ("power", "powerkernels", "powersteps", "powerduty", "powergaps", "powerstream", "powerfp8", "profile",
             "bigprofile", "fp8", "cudnnattention", "mlaattention", "headdims", "cudnnsteps")

#: wall-clock budget of one torchrun'd suite (collectives; multi-GPU steps)
WORKER_TIMEOUT_S = 330.0


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError("plansim measure needs PyTorch: pip install 'plansim[validation]'") from exc
    return torch


def measure(suite: str, out_dir: str, quick: bool = False, *, device: str = "cuda", log=None) -> list[str]:
    """Run ``suite`` (kernels|transfers|collectives|steps|all, or gpt2021, parallel2) on the visible GPUs;
    write one tidy CSV per suite and ``provenance.json`` into ``out_dir``; return the written paths.
    ``gpt2021`` (Megatron-LM 2021's GPT operators and steps) writes ``kernels_gpt.csv`` and
    ``steps_gpt.csv`` with the kernels and steps columns; ``parallel2`` (2-GPU expert and context
    parallelism) writes ``steps_parallel2.csv``; ``all`` includes neither.

    ``quick`` runs a few small cases of each suite (a smoke test, not data to keep).
    ``device="cpu"`` (with ``quick`` only) exercises the code paths without a GPU (gloo).
    Raises ``RuntimeError`` when no CUDA GPU is found (or torch is missing).
    """
    if suite != "all" and suite not in SUITES and suite not in EXTRA_SUITES:
        raise ValueError(f"suite: must be one of {', '.join(SUITES + ('all',) + tuple(EXTRA_SUITES))}, "
                         f"got {suite!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: must be cuda or cpu, got {device!r}")
    if device == "cpu" and not quick:
        raise ValueError("device=cpu is only a smoke test: use it with quick=True")
    if device == "cpu" and suite in CUDA_ONLY:
        raise ValueError(f"suite: {suite} reads CUDA kernel times (torch.profiler, CUDA events, clocks): "
                         "it has no CPU smoke test; run it on a GPU")
    torch = _torch()
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU found: plansim measure needs one (torch.cuda.is_available() is False)")
    log = log or (lambda msg: print(msg, flush=True))

    from plansim.validation.runner import provenance
    from plansim.validation.runner.launch import run_workers

    suites = list(SUITES) if suite == "all" else [suite]
    os.makedirs(out_dir, exist_ok=True)
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    n_gpus = torch.cuda.device_count() if device == "cuda" else 2
    info = provenance.collect(suites, quick, device)
    t0 = time.time()
    written = []
    for s in suites:
        ts = time.time()
        if s == "gpt2021":
            from plansim.validation.runner import gpt2021

            for name, columns in EXTRA_SUITES[s].items():
                rows = (gpt2021.run_kernels if columns == "kernels" else gpt2021.run_steps)(dev, quick, log)
                written.append(write_csv(os.path.join(out_dir, f"{name}.csv"), columns, rows))
                log(f"== {s}/{name}: {len(rows)} rows, {sum(r.get('status') == 'ok' for r in rows)} ok, "
                    f"{time.time() - ts:.0f} s -> {written[-1]}")
            continue
        if s in ("profile", "bigprofile"):
            from plansim.validation.runner import step_profile

            written += (step_profile.run(dev, quick, out_dir, log, n_gpus=n_gpus) if s == "profile"
                        else step_profile.run_big(dev, quick, out_dir, log))
            log(f"== {s}: {time.time() - ts:.0f} s -> {', '.join(written[-2:])}")
            continue
        if s in ("power", "powerkernels", "powersteps", "powerduty", "powergaps", "powerstream", "powerfp8"):
            from plansim.validation.runner import power, stream

            run = {"power": power.run, "powerkernels": power.run_kernels, "powersteps": power.run_steps,
                   "powerduty": power.run_duty, "powergaps": power.run_gaps, "powerstream": stream.run,
                   "powerfp8": lambda *a: power.run_kernels(*a, fp8=True)}[s]
            written += run(dev, quick, out_dir, log)
            log(f"== {s}: {time.time() - ts:.0f} s -> {', '.join(written[-2:])}")
            continue
        if s == "overlap":
            if n_gpus < 2:
                log("overlap: skipped, one GPU visible (needs 2)")
                continue
            _release(torch, device)
            written.append(_run_overlap(n_gpus, out_dir, log))
            log(f"== {s}: {time.time() - ts:.0f} s -> {written[-1]}")
            continue
        if s == "fsdp1":
            from plansim.validation.runner import step_profile, steps

            cases = steps.one_rank_cases(quick)
            wrapped = [c for c in cases if c["strategy"] != "single"]
            rows = steps.run_cases([c for c in cases if c["strategy"] == "single"], steps.run_single, dev, quick, log)
            _release(torch, device)
            rows += run_workers("steps", wrapped, 1, device, quick, WORKER_TIMEOUT_S, log)
            written.append(write_csv(os.path.join(out_dir, "steps.csv"), "steps", rows))
            # the profile beside the steps, in its own folder as every stored profile is
            written += step_profile.run_wrapped(wrapped, device, quick, os.path.join(out_dir, "profile"), log)
            log(f"== {s}: {len(rows)} rows, {time.time() - ts:.0f} s -> {', '.join(written[-3:])}")
            continue
        if s == "parallel2":
            from plansim.validation.runner import parallel2

            if n_gpus < 2:
                log("parallel2: skipped, one GPU visible (needs 2)")
                continue
            _release(torch, device)
            rows = run_workers("steps", parallel2.cases(quick, 2), 2, device, quick, WORKER_TIMEOUT_S, log)
            written.append(write_csv(os.path.join(out_dir, "steps_parallel2.csv"), "steps", rows))
            log(f"== {s}: {len(rows)} rows, {sum(r.get('status') == 'ok' for r in rows)} ok, "
                f"{time.time() - ts:.0f} s -> {written[-1]}")
            continue
        if s in ("kernels", "attention", "cudnnattention", "mlaattention", "headdims"):
            from plansim.validation.runner import kernels

            rows = {"kernels": kernels.run, "attention": kernels.run_attention_sweep,
                    "cudnnattention": kernels.run_cudnn_attention,
                    "mlaattention": kernels.run_mla_attention, "headdims": kernels.run_head_dims}[s](dev, quick, log)
        elif s == "fp8":
            from plansim.validation.runner import fp8

            rows = fp8.run(dev, quick, log)
        elif s in ("bigsteps", "cudnnsteps", "sacsteps"):
            from plansim.validation.runner import steps

            rows = steps.run_cases(steps.SINGLE_GPU_SUITES[s](quick), steps.run_single, dev, quick, log)
        elif s == "transfers":
            from plansim.validation.runner import transfers

            rows = transfers.run(dev, quick, log)
        elif s == "collectives":
            from plansim.validation.runner import collectives

            if n_gpus < 2:
                log("collectives: skipped, one GPU visible (needs 2 or more)")
                continue
            _release(torch, device)
            rows = run_workers("collectives", collectives.cases(n_gpus, quick), n_gpus, device, quick,
                               WORKER_TIMEOUT_S, log)
        else:
            from plansim.validation.runner import steps

            rows = steps.run(dev, quick, log)
            if n_gpus >= 2:
                _release(torch, device)
                rows += run_workers("steps", steps.dist_cases(quick, 2), 2, device, quick, WORKER_TIMEOUT_S, log)
            else:
                log("steps: 2-GPU cases (ddp, fsdp, tp, pp) skipped, one GPU visible")
        # a measured suite writes <suite>.csv; the extra ones that reuse a schema name their CSV
        name, columns = next(iter(EXTRA_SUITES[s].items())) if s in EXTRA_SUITES else (s, s)
        written.append(write_csv(os.path.join(out_dir, f"{name}.csv"), columns, rows))
        log(f"== {s}: {len(rows)} rows, {sum(r.get('status') == 'ok' for r in rows)} ok, "
            f"{time.time() - ts:.0f} s -> {written[-1]}")
    info["duration_s"] = round(time.time() - t0, 1)
    written.append(provenance.write(out_dir, info))
    return written


def _run_overlap(n_gpus: int, out_dir: str, log) -> str:
    """Suite ``overlap`` (validation/runner/overlap.py) under torchrun on every visible GPU."""
    import subprocess
    import sys

    from plansim.validation.runner.launch import SAFE_ENV

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "overlap.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_gpus}", script,
           "--out", out_dir]
    log(" ".join(cmd))
    subprocess.run(cmd, env={**os.environ, **SAFE_ENV, "PYTHONUNBUFFERED": "1"}, check=True, timeout=WORKER_TIMEOUT_S)
    return os.path.join(out_dir, "overlap.csv")


def _release(torch, device: str) -> None:
    """Give cached GPU memory back before child processes start on the same GPUs."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
