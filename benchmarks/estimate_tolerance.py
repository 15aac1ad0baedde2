"""How much faster than its analytic estimate can a plan simulate?  The search's confirmation
tolerance (``planner.search.ESTIMATE_TOLERANCE``) must cover it, or it may stop simulating before
the true winner.  For a few searches, event-simulate many more plans than the search needs
(``confirm=60``) and report, over them, the largest and smallest (estimate / event − 1).

    python benchmarks/estimate_tolerance.py
"""
from __future__ import annotations

from plansim.planner import search

CASES = [("llama3-8b", dict(nodes=2, global_batch=128, seq_len=8192)),
         ("llama3-70b", dict(nodes=8, global_batch=256, seq_len=8192)),
         ("mixtral-8x7b", dict(nodes=4, global_batch=256, seq_len=4096)),
         ("mixtral-8x7b", dict(nodes=4, global_batch=128, seq_len=4096, precision="fp8")),
         ("deepseek-moe-16b", dict(nodes=4, global_batch=256, seq_len=4096, moe_a2a_overlap=True)),
         ("llama3-8b", dict(nodes=2, global_batch=128, seq_len=8192, precision="fp8")),
         ("llama3-70b", dict(nodes=8, global_batch=256, seq_len=8192, precision="fp8")),
         ("llama3-8b", dict(nodes=2, global_batch=64, seq_len=8192, framework="pytorch"))]


def main() -> None:
    worst = 0.0
    for model, fields in CASES:
        frame = search(model, "h100-sxm", None, gpus_per_node=8, top=None, confirm=60, **fields)
        event = frame[frame["evaluated"] == "event"]
        gap = event["analytic_step_time_s"] / event["step_time_s"] - 1.0  # > 0: simulated faster
        worst = max(worst, float(gap.max()))
        print(f"{model} {fields.get('precision', 'bf16-mixed')} {fields.get('framework', 'megatron')} on {fields['nodes']}×8 H100: {len(event)} plans "
              f"simulated, at most {gap.max():+.2%} faster than estimated, at most {-gap.min():.2%} slower",
              flush=True)
    print(f"largest: {worst:+.2%}")


if __name__ == "__main__":
    main()
