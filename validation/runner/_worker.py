"""One rank of a multi-process suite; started by ``launch.run_workers`` through torchrun.

Runs its cases in order; rank 0 appends one JSON line per finished case to ``--results``.
On any failure the rank writes ``--fail-dir/rank<R>.json`` (case and status) and exits at
once, so torchrun stops the other ranks; the launcher records the case and restarts the
remaining ones.
"""
if __package__ in (None, ""):  # run as a script from a checkout: make plansim.validation importable
    import _bootstrap  # noqa: F401  (validation/runner/_bootstrap.py, beside this file)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", choices=("collectives", "steps", "profile"), required=True)
    p.add_argument("--cases", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--fail-dir", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from plansim.validation.runner import collectives, step_profile, steps
    from plansim.validation.runner.common import error_status

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if a.device == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=300), device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    with open(a.cases) as fh:
        cases = json.load(fh)
    groups = {}
    if a.task == "collectives":
        for gs in collectives.group_sizes(world):
            groups[gs] = dist.group.WORLD if gs == world else dist.new_group(list(range(gs)))
    for case in cases:
        try:
            if a.task == "collectives":
                row = collectives.run_case(case, rank, world, groups, device, a.quick)
            elif a.task == "profile":
                row = step_profile.run_dist_profile(case, rank, world, device)
            else:
                row = steps.run_dist_case(case, rank, world, device, a.quick)
        except BaseException as exc:  # noqa: BLE001 - recorded, then this rank stops the job
            with open(os.path.join(a.fail_dir, f"rank{rank}.json"), "w") as fh:
                json.dump({"case_id": case["case_id"], "status": error_status(exc),
                           "traceback": traceback.format_exc()[-4000:]}, fh)
            print(f"[rank {rank}] {case['case_id']}: {error_status(exc)}", file=sys.stderr, flush=True)
            os._exit(3)
        if rank == 0 and row is not None:
            with open(a.results, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            t = row.get("time_s", float("nan"))
            rate = row.get("busbw_GBps", row.get("tokens_per_s", 0.0))
            mem = row.get("peak_memory_bytes")
            print(f"{a.task} {row['case_id']:<62} {t:.4e} s  {rate:.4g}"
                  + (f"  {mem / 2**30:.1f} GiB" if mem else "") + f" {row['status']}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
