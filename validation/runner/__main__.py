"""``python -m plansim.validation.runner --suite all --out DIR`` (or run this file directly)."""
if __package__ in (None, ""):  # run as a script from a checkout: make plansim.validation importable
    import _bootstrap  # noqa: F401  (validation/runner/_bootstrap.py, beside this file)

import argparse  # noqa: E402
import sys  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m plansim.validation.runner",
                                description="Measure kernels, transfers, collectives and training steps.")
    from plansim.validation.runner.common import SUITES
    from plansim.validation.runner import EXTRA_SUITES
    p.add_argument("--suite", default="all", choices=(*SUITES, "all", *EXTRA_SUITES),
                   help="gpt2021: Megatron-LM 2021 GPT operators and steps -> kernels_gpt.csv, steps_gpt.csv; "
                        "parallel2: 2-GPU expert and context parallelism steps -> steps_parallel2.csv; "
                        "power: sustained clocks under the board power limit -> power.csv, power_samples.csv; "
                        "powerkernels: the power each kind of kernel draws -> power_kernels.csv")
    p.add_argument("--out", required=True, help="output folder, e.g. validation/data/h100-x1")
    p.add_argument("--quick", action="store_true", help="a few small cases: a smoke test")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: smoke test with --quick")
    a = p.parse_args(argv)
    from plansim.validation.runner import measure

    try:
        paths = measure(a.suite, a.out, a.quick, device=a.device)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
