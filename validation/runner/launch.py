"""Start a multi-process suite with torchrun over the visible GPUs, surviving failed cases."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def worker_command(task: str, nproc: int, cases_path: str, results_path: str, fail_dir: str,
                   device: str, quick: bool) -> list[str]:
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           worker, "--task", task, "--cases", cases_path, "--results", results_path,
           "--fail-dir", fail_dir, "--device", device]
    return cmd + (["--quick"] if quick else [])


def run_workers(task: str, cases: list[dict], nproc: int, device: str, quick: bool,
                timeout_s: float, log=print) -> list[dict]:
    """Run ``cases`` on ``nproc`` ranks; a case whose run kills the job is recorded with the
    status the failing rank reported (``oom`` or ``error:...``) and the rest are restarted."""
    env = dict(os.environ)
    env.update(SAFE_ENV)  # NVLink multicast stays off (device KINDS.md); harmless elsewhere
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    deadline = time.monotonic() + timeout_s
    rows: list[dict] = []
    remaining = list(cases)
    with tempfile.TemporaryDirectory(prefix=f"plansim-{task}-") as tmp:
        attempt = 0
        while remaining:
            attempt += 1
            cases_path = os.path.join(tmp, f"cases{attempt}.json")
            results_path = os.path.join(tmp, f"results{attempt}.jsonl")
            fail_dir = os.path.join(tmp, f"fail{attempt}")
            os.makedirs(fail_dir)
            with open(cases_path, "w") as fh:
                json.dump(remaining, fh)
            cmd = worker_command(task, nproc, cases_path, results_path, fail_dir, device, quick)
            left = deadline - time.monotonic()
            if left <= 5:
                for c in remaining:
                    rows.append(dict(c, status="error:suite time limit reached"))
                break
            proc = subprocess.Popen(cmd, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the torchrun we started and its ranks
                proc.wait()
                rc = "timeout"
            done = []
            if os.path.exists(results_path):
                with open(results_path) as fh:
                    done = [json.loads(line) for line in fh if line.strip()]
            rows += done
            ids = {r["case_id"] for r in done}
            remaining = [c for c in remaining if c["case_id"] not in ids]
            if rc == 0 or not remaining:
                for c in remaining:  # ran to the end without reporting them: should not happen
                    rows.append(dict(c, status="error:no result from worker"))
                break
            failed = remaining.pop(0)
            status = f"error:worker exit {rc}"
            for name in sorted(os.listdir(fail_dir)):
                with open(os.path.join(fail_dir, name)) as fh:
                    info = json.load(fh)
                if info.get("case_id") == failed["case_id"]:
                    status = info["status"] if status.startswith("error:worker") or info["status"] == "oom" \
                        else status
                    log(f"{task} {failed['case_id']} failed on {name}: {info['traceback'][-1500:]}")
            log(f"{task} {failed['case_id']:<62} {status}")
            rows.append(dict(failed, status=status))
    return rows
