"""The ``plansim`` command line: the JSON contracts of DESIGN.md, Chrome traces, and bad input
(one line on stderr naming the problem and what is allowed, exit code 2, no traceback)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plansim.cli import main

SMALL = ["--model", "llama3-8b", "--hardware", "h100-sxm", "--nodes", "1", "--gpus-per-node", "8"]


def _bad(capsys, argv: list[str]) -> str:
    """Run the CLI on bad input; return its one stderr line after checking the contract."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("error: ")
    assert out == ""
    return lines[0]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    paths = {
        "bad.json": '{"hidden_size": 4096,',
        "bad.yaml": "tp: [1, 2\n",
        "list.yaml": "- 1\n- 2\n",
        "unknown.yaml": "tp: 2\ntensor_parallel: 2\n",
        "partial.json": '{"model_type": "llama", "hidden_size": 128}',
        "badhw.yaml": "name: x\npeak_flops: [\n",
        "plan.yaml": "tp: 2\npp: 2\nglobal_batch: 8\nrecompute: selective\n",
    }
    out = {}
    for name, text in paths.items():
        (tmp_path / name).write_text(text)
        out[name] = str(tmp_path / name)
    out["missing"] = str(tmp_path / "missing.yaml")
    return out


# --- bad input --------------------------------------------------------------------------------
def test_unknown_model_names_the_built_ins(capsys):
    line = _bad(capsys, ["simulate", "--model", "gpt-5"])
    assert "'gpt-5'" in line and "llama3-8b" in line and "gpt3-175b" in line


def test_unknown_hardware_and_cluster_name_the_allowed_ones(capsys):
    line = _bad(capsys, ["simulate", "--hardware", "tpu-v9"])
    assert "'tpu-v9'" in line and "h100-sxm" in line and "mi300x" in line
    line = _bad(capsys, ["simulate", "--cluster", "nowhere"])
    assert "'nowhere'" in line and "dgx-h100" in line
    line = _bad(capsys, ["op", "--kind", "gemm", "--m", "1", "--n", "1", "--k", "1", "--hardware", "tpu-v9"])
    assert "'tpu-v9'" in line and "h100-sxm" in line


@pytest.mark.parametrize("argv, flag, value", [
    (["simulate", "--tp", "0"], "--tp", "'0'"),
    (["simulate", "--micro-batch", "-1"], "--micro-batch", "'-1'"),
    (["simulate", "--global-batch", "0"], "--global-batch", "'0'"),
    (["simulate", "--nodes", "0"], "--nodes", "'0'"),
    (["simulate", "--seq-len", "abc"], "--seq-len", "'abc'"),
    (["op", "--kind", "memcpy", "--bytes", "0"], "--bytes", "'0'"),
    (["collective", "--op", "all_reduce", "--bytes", "-1"], "--bytes", "'-1'"),
])
def test_non_positive_sizes(capsys, argv, flag, value):
    line = _bad(capsys, argv)
    assert flag in line and value in line and "positive" in line


def test_non_positive_nic_rate(capsys):
    line = _bad(capsys, ["simulate", "--nic-gbps", "-5"])
    assert "nic_gbps" in line and "positive" in line and "-5" in line


@pytest.mark.parametrize("argv, heads", [
    (["simulate", "--model", "llama3-8b", "--tp", "3", "--nodes", "1", "--gpus-per-node", "3"], "32"),
    (["simulate", "--model", "gpt3-175b", "--tp", "64", "--nodes", "8"], "96"),
])
def test_tp_not_dividing_heads(capsys, argv, heads):
    line = _bad(capsys, argv)
    assert "tp:" in line and "attention heads" in line and heads in line


def test_gpu_count_not_the_product_of_degrees(capsys):
    line = _bad(capsys, ["simulate", *SMALL, "--tp", "2", "--pp", "2", "--dp", "3"])
    assert "2·2·3·1 = 12" in line and "8 GPUs" in line
    line = _bad(capsys, ["simulate", *SMALL, "--tp", "2", "--pp", "3"])
    assert "8 GPUs" in line and "tp·pp·cp = 6" in line


def test_unreadable_model_files(capsys, files):
    line = _bad(capsys, ["simulate", "--model", files["bad.json"]])
    assert files["bad.json"] in line and "not valid JSON" in line
    line = _bad(capsys, ["simulate", "--model", files["partial.json"]])
    assert files["partial.json"] in line and "num_hidden_layers" in line
    line = _bad(capsys, ["simulate", "--model", files["list.yaml"]])
    assert files["list.yaml"] in line and "mapping" in line
    line = _bad(capsys, ["simulate", "--model", files["missing"].replace(".yaml", ".json")])
    assert "not found" in line


def test_unreadable_plan_files(capsys, files):
    line = _bad(capsys, ["simulate", "--plan", files["bad.yaml"]])
    assert files["bad.yaml"] in line and "not valid YAML" in line
    line = _bad(capsys, ["simulate", "--plan", files["list.yaml"]])
    assert "mapping of plan fields" in line
    line = _bad(capsys, ["simulate", "--plan", files["missing"]])
    assert files["missing"] in line and "cannot read" in line
    line = _bad(capsys, ["simulate", "--plan", files["unknown.yaml"]])
    assert "'tensor_parallel'" in line and "allowed:" in line and "tp" in line


def test_unreadable_hardware_file(capsys, files):
    line = _bad(capsys, ["simulate", "--hardware", files["badhw.yaml"]])
    assert files["badhw.yaml"] in line and "YAML" in line


@pytest.mark.parametrize("argv, words", [
    (["simulate", "--recompute", "some"], ["--recompute", "'some'", "selective", "full"]),
    (["simulate", "--zero", "5"], ["--zero", "0, 1, 2, 3"]),
    (["simulate", "--schedule", "pipedream"], ["--schedule", "1f1b", "interleaved"]),
    (["simulate", "--offload", "optimizer=tape"], ["offload.optimizer", "'tape'", "cpu", "nvme"]),
    (["simulate", "--offload", "optimizer"], ["--offload", "WHAT=TIER"]),
    (["simulate", "--global-batch", "3", "--dp", "2", "--tp", "4"], ["global_batch", "3", "dp·micro_batch"]),
    (["simulate", "--pp", "64", "--nodes", "8"], ["pp", "64", "32 layers"]),
    (["collective", "--op", "gather", "--bytes", "1"], ["--op", "'gather'", "all_reduce"]),
    (["op", "--kind", "gemm", "--m", "4"], ["--n", "--k", "missing"]),
    (["op", "--kind", "gemm", "--m", "1", "--n", "1", "--k", "1", "--dtype", "fp32", "--hardware", "ascend-910b"],
     ["'fp32'", "ascend-910b", "bf16"]),
    (["frobnicate"], ["invalid choice", "simulate"]),
    (["simulate", "--hardware", "h200", "--power-limit", "90"], ["power_limit", "90 W", "idle draw"]),
    (["search", "--model", "llama3-8b", "--global-batch", "8", "--power-limit", "0"], ["power_limit", "positive"]),
    (["simulate", "--first-stage-layers", "100", "--pp", "2"], ["first_stage_layers", "100", "between 1 and"]),
    (["op", "--kind", "attention", "--batch", "1", "--heads", "32", "--kv-heads", "5", "--head-dim", "128",
      "--seq-len", "128"], ["kv-heads", "5", "divide heads 32"]),
    (["simulate", "--power-limit", "5000"], ["power_limit", "5000 W", "board limit (700 W)"]),
    (["simulate", "--vpp", "3", "--schedule", "interleaved"], ["schedule", "'interleaved'", "pp > 1"]),
    (["collective", "--op", "all_reduce", "--bytes", "1MiB", "--nodes", "1", "--gpus-per-node", "1"],
     ["ranks", "at least 2 GPUs"]),
    (["validate", "--profiles", "/no/such/folder"], ["profiles", "/no/such/folder", "no such directory"]),
    (["simulate", "--ep", "2"], ["ep", "mixture-of-experts", "dense"]),
    (["simulate", "--trace-detail", "op"], ["--trace-detail", "needs --trace"]),
    (["simulate", "--tp", "2", "--etp", "1"], ["etp", "mixture-of-experts", "dense"]),
    (["simulate", "--model", "gpt3-175b", "--tp", "8", "--seq-len", "4096"], ["seq_len", "4096", "2048 learned"]),
    (["simulate", "--precision", "fp8", "--hardware", "a100-80gb"], ["precision", "fp8", "a100-80gb"]),
    (["search", "--model", "tinyllama-1.1b", "--global-batch", "8", "--plot", "plans.txt"], ["plot", ".png"]),
    (["search", "--model", "tinyllama-1.1b", "--global-batch", "8", "--out", "/no/such/folder/plans.csv"],
     ["out", "/no/such/folder", "does not exist"]),
])
def test_other_bad_input(capsys, argv, words):
    line = _bad(capsys, argv)
    for w in words:
        assert w in line, (w, line)


@pytest.mark.parametrize("text, words", [
    ("tp: two\n", ["tp", "positive integer", "'two'"]),
    ("tp: [2]\n", ["tp", "positive integer"]),
    ("tp: 2.5\n", ["tp", "positive integer", "2.5"]),
    ("offload: cpu\n", ["offload", "optimizer: cpu"]),
    ('fp32_grads: "no"\n', ["fp32_grads", "true or false", "'no'"]),  # a string is not a YAML boolean
    ("overlap_p2p: 7\n", ["overlap_p2p", "true or false"]),
])
def test_plan_file_fields_of_the_wrong_type(capsys, tmp_path, text, words):
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    line = _bad(capsys, ["simulate", "--plan", str(plan)])
    for w in words:
        assert w in line, (w, line)


def test_a_trace_path_that_is_a_directory_is_named(capsys, tmp_path):
    line = _bad(capsys, ["simulate", *SMALL, "--trace", str(tmp_path)])
    assert str(tmp_path) in line and "Is a directory" in line and ".tmp" not in line


def test_a_one_device_cluster_without_a_network_simulates(capsys):
    """The built-in laptop (one NPU, no inter-node link) needs no pipeline send."""
    assert main(["simulate", "--cluster", "laptop", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["step_time_s"] > 0


def test_an_output_that_cannot_be_written_is_a_clean_error(capsys, tmp_path):
    missing = str(tmp_path / "no-such-dir" / "trace.json")
    line = _bad(capsys, ["simulate", *SMALL, "--trace", missing])
    assert line.startswith("error: trace:") and missing in line and "does not exist" in line


def test_a_failed_write_leaves_the_existing_file_intact(tmp_path):
    """Results are written whole or not at all: an exception mid-write keeps the old file."""
    from plansim.simulator.files import write_atomically
    target = tmp_path / "result.csv"
    target.write_text("earlier results\n")

    def half_write(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(target, half_write)
    assert target.read_text() == "earlier results\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.csv"]


# --- results ----------------------------------------------------------------------------------
CONTRACT = {"step_time_s", "tokens_per_s", "mfu", "fits", "peak_memory_bytes", "memory_breakdown",
            "time_breakdown", "plan"}


def test_simulate_json_has_every_contract_field(capsys):
    assert main(["simulate", *SMALL, "--tp", "2", "--pp", "2", "--global-batch", "8", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert CONTRACT <= set(out)
    assert set(out["memory_breakdown"]) >= {"params", "grads", "optimizer", "activations", "other"}
    assert set(out["time_breakdown"]) >= {"compute", "exposed_communication", "exposed_transfers",
                                          "pipeline_bubble"}
    assert isinstance(out["fits"], bool)
    for key in ("step_time_s", "tokens_per_s", "mfu", "peak_memory_bytes"):
        assert isinstance(out[key], (int, float)) and out[key] > 0
    # the resolved plan: defaults filled in (dp from the GPU count, SP on with tp > 1)
    plan = out["plan"]
    assert (plan["tp"], plan["pp"], plan["dp"], plan["global_batch"]) == (2, 2, 2, 8)
    assert plan["sequence_parallel"] is True and plan["schedule"] == "1f1b"
    assert out["tokens_per_s"] == pytest.approx(8 * plan["seq_len"] / out["step_time_s"])


def test_simulate_plan_file_and_flags_override_it(capsys, files):
    assert main(["simulate", *SMALL, "--plan", files["plan.yaml"], "--pp", "1", "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert (plan["tp"], plan["pp"], plan["dp"], plan["recompute"]) == (2, 1, 4, "selective")


def test_cross_entropy_flag_reaches_the_plan_and_the_search(capsys):
    """``--cross-entropy fused`` (flash-attn's xentropy) is a plan field for simulate and a fixed
    field of every plan for search; the fused loss holds less, so peak memory drops."""
    peaks = {}
    for loss in ("unfused", "fused"):
        assert main(["simulate", *SMALL, "--global-batch", "16", "--micro-batch", "2", "--zero", "3", "--cross-entropy", loss,
                     "--format", "json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["plan"]["cross_entropy"] == loss
        peaks[loss] = out["peak_memory_bytes"]
    assert peaks["fused"] < peaks["unfused"]
    assert main(["search", *SMALL, "--global-batch", "16", "--cross-entropy", "fused", "--top", "2",
                 "--format", "json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["plans"]
    assert "cross-entropy" in _bad(capsys, ["simulate", *SMALL, "--cross-entropy", "liger"])


def test_moe_dispatcher_flag_reaches_the_plan_and_the_search(capsys):
    """``--moe-dispatcher fused`` (DeepEP, HybridEP) drops the alltoall dispatcher's permutation
    copies and the expert outputs kept for the weighting: faster and smaller, same all-to-alls."""
    moe = ["--model", "mixtral-8x7b", "--hardware", "h100-sxm", "--nodes", "1", "--gpus-per-node", "8"]
    results = {}
    for dispatcher in ("alltoall", "fused"):
        assert main(["simulate", *moe, "--ep", "8", "--zero", "1", "--global-batch", "8", "--seq-len", "4096",
                     "--moe-dispatcher", dispatcher, "--format", "json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["plan"]["moe_dispatcher"] == dispatcher
        results[dispatcher] = out
    assert results["fused"]["step_time_s"] < results["alltoall"]["step_time_s"]
    assert results["fused"]["peak_memory_bytes"] < results["alltoall"]["peak_memory_bytes"]
    assert main(["search", "--model", "mixtral-8x7b", "--hardware", "h100-sxm", "--nodes", "4", "--gpus-per-node", "8",
                 "--global-batch", "32", "--seq-len", "4096", "--moe-dispatcher", "fused", "--top", "2",
                 "--format", "json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["plans"]
    assert "moe-dispatcher" in _bad(capsys, ["simulate", *moe, "--moe-dispatcher", "deepep"])
    # Megatron-Core's EP overlap: a plan switch too, hiding all-to-alls once there are micro-batches to pair
    steps = {}
    for switch in ("--moe-a2a-overlap", "--no-moe-a2a-overlap"):
        assert main(["simulate", *moe, "--ep", "8", "--zero", "1", "--global-batch", "32", "--seq-len", "4096",
                     switch, "--format", "json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["plan"]["moe_a2a_overlap"] is (switch == "--moe-a2a-overlap")
        steps[switch] = out["step_time_s"]
    assert steps["--moe-a2a-overlap"] < steps["--no-moe-a2a-overlap"]


def test_simulate_table_is_readable(capsys):
    assert main(["simulate", *SMALL, "--tp", "8"]) == 0
    out = capsys.readouterr().out
    assert "step time" in out and "MFU" in out and "peak memory" in out


def _trace(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert isinstance(data["traceEvents"], list) and data["traceEvents"]
    for e in data["traceEvents"]:
        assert e["ph"] in ("X", "M", "C") and "pid" in e and "name" in e
        if e["ph"] == "X":
            assert e["dur"] >= 0 and e["ts"] >= 0 and isinstance(e["tid"], int)
    return data


def test_trace_has_compute_and_comm_streams(capsys, tmp_path):
    path = tmp_path / "trace.json"
    assert main(["simulate", *SMALL, "--tp", "2", "--pp", "2", "--global-batch", "8",
                 "--trace", str(path), "--format", "json"]) == 0
    capsys.readouterr()
    data = _trace(path)
    cats = {e.get("cat") for e in data["traceEvents"] if e["ph"] == "X"}
    assert "compute" in cats
    assert {"comm:tp", "comm:dp", "comm:pp"} <= cats
    threads = {e["args"]["name"] for e in data["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"compute", "copy"} <= threads and any(t.startswith("comm") for t in threads)
    pids = {e["pid"] for e in data["traceEvents"] if e["ph"] == "X"}
    assert pids == {0, 1}  # one process per pipeline stage


def test_trace_with_offload_has_a_copy_stream(capsys, tmp_path):
    path = tmp_path / "trace.json"
    assert main(["simulate", *SMALL, "--tp", "8", "--offload", "optimizer=cpu", "--trace", str(path)]) == 0
    capsys.readouterr()
    cats = {e.get("cat") for e in _trace(path)["traceEvents"] if e["ph"] == "X"}
    assert {"compute", "comm:tp", "copy"} <= cats


def test_offloaded_states_that_overflow_the_host_are_reported(capsys, tmp_path):
    """Llama-3-8B replicated on 8 GPUs (tp 1, dp 8, ZeRO 0) with its optimizer on the host: every
    GPU's fp32 states and gradients of all 8B parameters (14 B each, 8 × 112 GB on the node)
    overflow a 256 GiB host.  The result says so (fits false, the reason), and the table shows
    the reason beside a device memory that fits."""
    host = tmp_path / "small-host.yaml"
    host.write_text("cpu: test\ncpu_cores: 32\ndram: 256 GiB\ndram_bw: 200 GB/s\ncpu_adam_params_per_s: 1.0e9\n"
                    "sources: {cpu_cores: test, dram: test, dram_bw: test, cpu_adam_params_per_s: test}\n")
    cluster = tmp_path / "small.yaml"
    cluster.write_text(f"device: h100-sxm\nnodes: 1\ngpus_per_node: 8\nintra_node_link: nvlink4-nvswitch\n"
                       f"host: {host}\nhost_link: pcie5-x16\nsources: {{nodes: test, gpus_per_node: test}}\n")
    argv = ["simulate", "--model", "llama3-8b", "--cluster", str(cluster), "--zero", "0", "--recompute", "full",
            "--offload", "optimizer=cpu", "--global-batch", "8", "--seq-len", "2048"]
    assert main(argv + ["--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["infeasible_reason"].startswith("out of host memory")
    assert out["peak_memory_bytes"] < 76 * 2**30
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "infeasible" in table and "out of host memory" in table and "(fits)" in table


def test_trace_detail_op_lists_kernels(capsys, tmp_path):
    path = tmp_path / "trace.json"
    assert main(["simulate", *SMALL, "--tp", "8", "--trace", str(path), "--trace-detail", "op"]) == 0
    capsys.readouterr()
    names = {e["name"] for e in _trace(path)["traceEvents"] if e.get("cat") == "kernels"}
    assert {"qkv", "mlp.down", "logits"} <= names


@pytest.mark.parametrize("argv, rate", [
    (["--kind", "gemm", "--m", "4096", "--n", "4096", "--k", "4096"], "tflops"),
    (["--kind", "gemm", "--m", "4096", "--n", "4096", "--k", "4096", "--dtype", "fp8"], "tflops"),
    (["--kind", "attention", "--batch", "1", "--heads", "32", "--kv-heads", "8", "--head-dim", "128",
      "--seq-len", "4096", "--causal", "--phase", "both"], "tflops"),
    (["--kind", "memcpy", "--bytes", "1GiB"], "bandwidth_GBps"),
    (["--kind", "elementwise", "--bytes", "64MiB"], "bandwidth_GBps"),
    (["--kind", "h2d", "--bytes", "1GiB"], "bandwidth_GBps"),
    (["--kind", "d2h", "--bytes", "1GiB", "--pageable"], "bandwidth_GBps"),
])
def test_op_json(capsys, argv, rate):
    assert main(["op", *argv, "--hardware", "h100-sxm", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["time_s"] > 0 and out[rate] > 0


@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"])
def test_collective_json(capsys, op):
    assert main(["collective", "--op", op, "--bytes", "1GiB", "--hardware", "h200", "--nodes", "1",
                 "--gpus-per-node", "4", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"time_s", "algbw_gbps", "busbw_gbps"} <= set(out)
    assert out["time_s"] > 0 and out["algbw_gbps"] > 0 and out["busbw_gbps"] > 0
    assert out["algbw_gbps"] == pytest.approx(2**30 / out["time_s"] / 1e9)
    factor = {"all_reduce": 2 * 3 / 4, "broadcast": 1.0}.get(op, 3 / 4)
    assert out["busbw_gbps"] == pytest.approx(out["algbw_gbps"] * factor)


def test_lists(capsys):
    assert main(["hardware", "list", "--format", "json"]) == 0
    names = {row["name"] for row in json.loads(capsys.readouterr().out)}
    assert {"h100-sxm", "h200", "a100-80gb", "a100-40gb", "b200", "mi300x", "mi250x-gcd", "ascend-910b"} <= names
    assert main(["models", "list", "--format", "json"]) == 0
    names = {row["name"] for row in json.loads(capsys.readouterr().out)}
    assert {"llama2-7b", "llama2-70b", "llama3-8b", "llama3-70b", "llama3-405b", "gpt3-175b", "mixtral-8x7b"} <= names


# --- end to end -----------------------------------------------------------------------------------
def _console_script() -> str:
    script = Path(sys.executable).parent / ("plansim.exe" if os.name == "nt" else "plansim")
    if not script.exists():
        pytest.skip("the plansim console script is not installed next to this interpreter")
    return str(script)


def test_installed_console_script_end_to_end(tmp_path):
    trace = tmp_path / "t.json"
    proc = subprocess.run([_console_script(), "simulate", "--model", "llama3-8b", "--hardware", "h100-sxm",
                           "--tp", "2", "--pp", "2", "--global-batch", "8", "--format", "json",
                           "--trace", str(trace)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert CONTRACT <= set(out) and out["step_time_s"] > 0
    assert json.loads(trace.read_text())["traceEvents"]


def test_installed_console_script_bad_input():
    proc = subprocess.run([_console_script(), "simulate", "--tp", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_op_prices_cudnn_attention_and_split_accumulating_fp8_gemms(capsys):
    """``plansim op`` reaches the kernels Megatron-Core runs: cuDNN attention, fp8 dgrad/wgrad."""
    def op(*argv):
        assert main(["op", *argv, "--hardware", "h200", "--format", "json"]) == 0
        return json.loads(capsys.readouterr().out)["time_s"]
    attention = ["--kind", "attention", "--batch", "1", "--heads", "32", "--kv-heads", "8", "--head-dim", "128",
                 "--seq-len", "8192", "--causal"]
    assert op(*attention, "--attention", "cudnn") < 0.6 * op(*attention)
    gemm = ["--kind", "gemm", "--m", "8192", "--n", "8192", "--k", "8192", "--dtype", "fp8"]
    assert op(*gemm) < op(*gemm, "--split-accumulate") < 1.15 * op(*gemm)


@pytest.mark.parametrize("flag, field", [("--tp-comm-overlap", "tp_comm_overlap"), ("--fp32-grads", "fp32_grads")])
def test_overlap_and_gradient_flags_reach_every_searched_plan(capsys, flag, field):
    """``search --tp-comm-overlap`` / ``--fp32-grads`` fix the field in every plan ranked, and
    ``simulate`` takes the same switch as a plan flag."""
    assert main(["search", *SMALL, "--global-batch", "16", flag, "--top", "3", "--format", "json", "--no-progress"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert plans and all(p["plan"][field] is True for p in plans)
    assert main(["simulate", *SMALL, "--tp", "2", "--global-batch", "8", flag, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"][field] is True
