"""The search: pruning keeps the winner, constraints hold, infeasible plans say why, bad input is
one line, and the executors agree."""
from __future__ import annotations

import json

import pytest

from plansim.planner import SearchSpace, search
from plansim.planner.executors import simulate_task
from plansim.planner.space import enumerate_plans
from plansim.simulator.hardware import ProfileError, build_cluster
from plansim.workloads.model_io import load_model
from plansim.workloads.plan import PlanError
from plansim.workloads.training import split_layers

from .cli_helper import run

MODEL = load_model("tinyllama-1.1b")
SMALL = SearchSpace(micro_batch=(1, 2, 4), max_vpp=4)


def small_search(**kw):
    args = dict(hardware="h100-sxm", nodes=1, gpus_per_node=8, global_batch=64, seq_len=2048, top=None,
                executor="inline", calibrated=False, space=SMALL)
    args.update(kw)
    return search(MODEL, **args)


@pytest.mark.parametrize("gpus, batch", [(4, 32), (8, 64)])
def test_pruning_never_discards_the_exhaustive_winner(gpus, batch):
    """Event-simulate every well-formed plan of a small space: the search's winner is the best."""
    cluster = build_cluster("h100-sxm", None, 1, gpus)
    plans = enumerate_plans(MODEL, cluster, SMALL, seq_len=2048, global_batch=batch).plans
    results = [simulate_task(MODEL, cluster, p) for p in plans]
    best = max(r["tokens_per_s"] for r in results if r["fits"])
    frame = small_search(gpus_per_node=gpus, global_batch=batch, confirm=3)
    assert frame.iloc[0]["evaluated"] == "event"
    assert frame.iloc[0]["tokens_per_s"] == pytest.approx(best, rel=1e-9)


def test_pruning_keeps_the_winner_among_recomputation_policies_that_do_not_nest():
    """PyTorch plans at 16k tokens under a 40 GiB cap, which the winner's layout without
    recomputation exceeds and with Megatron's selective fits: torchtitan's op-level policy re-runs
    other ops than selective (GEMMs, not attention) and here runs faster, so selective fitting must
    not prune it; the winner is exhaustive event simulation's best."""
    space = SearchSpace(micro_batch=(1, 2, 4), max_vpp=2, plan_defaults={"framework": "pytorch"})
    cap = 40 * 2**30
    cluster = build_cluster("h100-sxm", None, 1, 2)
    plans = enumerate_plans(MODEL, cluster, space, seq_len=16384, global_batch=4).plans
    results = [(simulate_task(MODEL, cluster, p), p) for p in plans]
    fitting = [(r, p) for r, p in results if r["fits"] and r["peak_memory_bytes"] <= cap]
    best, winner = max(fitting, key=lambda rp: rp[0]["tokens_per_s"])
    siblings = {p.recompute for _, p in fitting if p.replace(recompute=winner.recompute) == winner}
    assert winner.recompute == "selective-op" and "selective" in siblings  # the case this test is for
    frame = small_search(gpus_per_node=2, global_batch=4, seq_len=16384, space=space, confirm=3,
                         constraints=["max-memory=40GiB"])
    assert frame.iloc[0]["tokens_per_s"] == pytest.approx(best["tokens_per_s"], rel=1e-9)


def test_partial_recomputation_keeps_the_exhaustive_winner():
    """With ``partial_recompute`` the search stands a fully recomputed plan in for every number of
    recomputed layers per chunk by the fewest that fit; exhaustive event simulation over all of
    them (TinyLlama, 16k tokens on 2 GPUs, under two memory caps) finds the same winner, and it
    recomputes only some layers."""
    cluster = build_cluster("h100-sxm", None, 1, 2)
    space = SearchSpace(micro_batch=(1, 2), max_vpp=2, partial_recompute=True)
    every = []
    for plan in enumerate_plans(MODEL, cluster, space, seq_len=16384, global_batch=4).plans:
        every.append(plan)
        if plan.recompute == "full":
            layers = max(split_layers(MODEL.num_layers, plan.pp * plan.vpp))
            every += [plan.replace(recompute_layers=k) for k in range(1, layers)]
    results = [(simulate_task(MODEL, cluster, p), p) for p in every]
    for cap in (16, 20):
        best, winner = max(((r, p) for r, p in results if r["fits"] and r["peak_memory_bytes"] <= cap * 2**30),
                           key=lambda rp: rp[0]["tokens_per_s"])
        assert winner.recompute_layers is not None
        frame = small_search(gpus_per_node=2, global_batch=4, seq_len=16384, space=space, confirm=3,
                             constraints=[f"max-memory={cap}GiB"])
        assert frame.iloc[0]["tokens_per_s"] == pytest.approx(best["tokens_per_s"], rel=1e-9)
        assert frame.iloc[0]["recompute_layers"] == winner.recompute_layers


def test_every_reported_plan_respects_the_constraints():
    cons = ["tp<=2", "zero>=1", "max-memory=20GiB", "recompute!=full"]
    frame = small_search(constraints=cons)
    assert len(frame) > 0
    assert (frame.tp <= 2).all() and (frame.zero >= 1).all() and (frame.recompute != "full").all()
    assert (frame.peak_memory_bytes <= 20 * 2**30).all()


def test_infeasible_plans_carry_their_reason():
    frame = search("llama3-70b", "h100-sxm", nodes=1, gpus_per_node=8, global_batch=16, seq_len=4096,
                   executor="inline", list_infeasible=True, top=3, confirm=1)
    infeasible = frame.attrs["infeasible"]
    assert infeasible and all(item["reason"] and item["count"] >= 1 for item in infeasible)
    assert any(item["reason"].startswith("out of memory: peak") for item in infeasible)
    summary = frame.attrs["summary"]
    assert summary["explored"] == summary["pruned"] + summary["feasible"]


def test_frame_columns_and_objectives():
    frame = small_search(objective="cost", tokens=1e12, top=5)
    for col in ("tp", "pp", "dp", "cp", "ep", "zero", "micro_batch", "step_time_s", "tokens_per_s", "mfu", "fits",
                "peak_memory_bytes", "memory_breakdown", "time_breakdown", "plan", "cost_per_million_tokens_usd",
                "time_to_train_s"):
        assert col in frame.columns
    costs = list(frame.cost_per_million_tokens_usd)
    assert costs == sorted(costs) and all(c > 0 for c in costs)
    row = frame.iloc[0]
    assert row.time_to_train_s == pytest.approx(1e12 / row.tokens_per_s)
    assert row.cost_per_million_tokens_usd == pytest.approx(
        2.99 * 8 * row.step_time_s / 3600 / (row.global_batch * row.seq_len) * 1e6)


def test_price_override_and_hardware_choice():
    frame = small_search(hardware="h100-sxm,a100-80gb", objective="cost", prices=["h100-sxm=0.5"], top=None)
    assert set(frame.hardware) == {"h100-sxm", "a100-80gb"}
    assert frame.iloc[0].hardware == "h100-sxm"  # at 0.5 USD/h the H100 is far cheaper per token
    assert (frame[frame.hardware == "h100-sxm"].price_per_gpu_hour_usd == 0.5).all()


def test_gpu_range_and_max_global_batch():
    frame = small_search(gpus="2..8", nodes=None, global_batch=None, max_global_batch=60, top=None)
    assert set(frame.num_gpus) == {2, 4, 8}
    assert all(gb <= 60 for gb in frame.global_batch)


def test_pareto_front_is_non_dominated():
    frame = small_search(pareto="throughput,memory")
    assert len(frame) >= 1
    rows = frame[["tokens_per_s", "peak_memory_bytes"]].values.tolist()
    for t, m in rows:
        assert not any(t2 >= t and m2 <= m and (t2 > t or m2 < m) for t2, m2 in rows)


@pytest.mark.parametrize("kw, field", [
    (dict(objective="speed"), "objective"),
    (dict(hardware="h100-sxm,tpu-v9"), "devices"),
    (dict(nodes=641, global_batch=2520), "global_batch"),
    (dict(constraints=["tp=3"]), "constraint"),
    (dict(constraints=["tp<=>3"]), "constraint"),
    (dict(objective="time-to-train"), "tokens"),
    (dict(pareto="throughput"), "pareto"),
    (dict(gpus="8..2"), "gpus"),
    (dict(prices=["h100=2.5"]), "price"),
    (dict(gpus="8,16"), "gpus"),  # with nodes=1: the layout is given twice
    (dict(gpus="8,,16", nodes=None), "gpus"),
    (dict(hardware="h100-sxm,"), "hardware"),
    (dict(address="10.0.0.1:6379"), "address"),  # without executor="ray" it would run locally, unasked  # a typo for h100-sxm must not leave the list price silently
    (dict(constraints=["max-memory=0"]), "constraint"),
])
def test_bad_input_is_one_line(kw, field):
    with pytest.raises((PlanError, ProfileError)) as exc:
        small_search(**kw)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(field)


def test_empty_result_says_why():
    frame = search("llama3-70b", "h100-sxm", nodes=1, gpus_per_node=2, global_batch=8, seq_len=8192,
                   executor="inline", calibrated=False)
    assert frame.empty
    assert frame.attrs["why_empty"].startswith("no plan fits:") and "out of memory" in frame.attrs["why_empty"]


def test_local_pool_matches_inline():
    a = small_search(top=8)
    b = small_search(top=8, executor="local", workers=2)
    cols = ["tp", "pp", "dp", "zero", "micro_batch", "recompute", "schedule", "vpp", "step_time_s", "peak_memory_bytes"]
    assert a[cols].equals(b[cols])


# --- the CLI -------------------------------------------------------------------------------------
BASE = ["search", "--model", "tinyllama-1.1b", "--hardware", "h100-sxm", "--nodes", "1", "--gpus-per-node", "8",
        "--global-batch", "64", "--no-calibration", "--workers", "1", "--top", "3"]


def test_cli_json(capsys):
    assert run(BASE + ["--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["plans"]) == 3 and out["summary"]["explored"] > 0
    row = out["plans"][0]
    for key in ("step_time_s", "tokens_per_s", "mfu", "fits", "peak_memory_bytes", "memory_breakdown",
                "time_breakdown", "plan", "tp", "pp", "dp"):
        assert key in row


def test_cli_table_explain_out_and_plot(tmp_path, capsys):
    out, png = tmp_path / "plans.parquet", tmp_path / "pareto.png"
    assert run(BASE + ["--explain", "--out", str(out), "--plot", str(png), "--pareto", "throughput,memory",
                       "--list-infeasible"]) == 0
    text = capsys.readouterr().out
    assert "plans explored" in text and "winner:" in text and "infeasible plans" in text
    import pandas as pd
    assert len(pd.read_parquet(out)) >= 1 and png.stat().st_size > 1000


def test_cli_framework_and_partial_recompute(capsys):
    """``--framework pytorch`` searches PyTorch plans (torchtitan's op-level recomputation among
    them); ``--partial-recompute`` shows the fewest recomputed layers per chunk that fit a cap."""
    base = ["search", "--model", "tinyllama-1.1b", "--hardware", "h100-sxm", "--nodes", "1", "--gpus-per-node",
            "2", "--global-batch", "4", "--seq-len", "16384", "--no-calibration", "--workers", "1",
            "--format", "json", "--top", "50"]
    assert run(base + ["--framework", "pytorch", "--constraint", "recompute=selective-op"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert plans and all(p["plan"]["framework"] == "pytorch" and p["recompute"] == "selective-op" for p in plans)
    assert run(base + ["--partial-recompute", "--constraint", "max-memory=20GiB"]) == 0
    best = json.loads(capsys.readouterr().out)["plans"][0]
    assert best["recompute"] == "full" and 1 <= best["recompute_layers"] < 22


def test_cli_offload_optimizer_reaches_the_plans(capsys):
    """``--offload-optimizer gpu,cpu`` weighs the CPU placement against the GPU's: TinyLlama on one
    GPU under a 12 GiB cap fits only with its optimizer states on the host, and every plan shown
    says so in its ``optimizer_tier`` and its plan."""
    argv = ["search", "--model", "tinyllama-1.1b", "--hardware", "h100-sxm", "--gpus", "1", "--global-batch", "8",
            "--seq-len", "2048", "--no-calibration", "--format", "json", "--constraint", "max-memory=12GiB"]
    assert run(argv + ["--offload-optimizer", "gpu,cpu"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert plans and all(p["optimizer_tier"] == "cpu" and p["plan"]["offload"] == {"optimizer": "cpu"}
                         for p in plans)
    assert run(argv) == 1  # on the GPU alone nothing fits under the cap
    assert "no plan fits" in capsys.readouterr().err
    assert run(argv + ["--offload-optimizer", "gpu,cpu", "--offload-activations", "--top", "40"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert {p["activations_tier"] for p in plans} == {"gpu", "cpu"}
    assert all(p["plan"]["offload"].get("activations", "gpu") == p["activations_tier"] for p in plans)


def test_cli_csv(capsys):
    assert run(BASE + ["--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("rank,hardware") and len(lines) == 4


@pytest.mark.parametrize("extra", [["--objective", "speed"], ["--hardware", "h100-sxm,nope"],
                                   ["--constraint", "tp=3"], ["--executor", "slurm"],
                                   ["--offload-optimizer", "gpu,tape"], ["--offload-optimizer", "cxl"]])
def test_cli_bad_input_exit_2(extra, capsys):
    argv = list(BASE)
    if extra[0] == "--hardware":
        argv[argv.index("--hardware") + 1] = extra[1]
    else:
        argv += extra
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1


def test_search_takes_the_clusters_device_unless_told_otherwise():
    """--cluster dgx-a100 alone searches A100s (it searched H100s on A100 nodes before); repeated
    --hardware names count once."""
    frame = search("tinyllama-1.1b", cluster="dgx-a100", global_batch=64, top=2, executor="inline", calibrated=False)
    assert set(frame["hardware"]) == {"a100-80gb"}
    frame = search("tinyllama-1.1b", "h100-sxm,h100-sxm", nodes=1, gpus_per_node=8, global_batch=64, top=None,
                   executor="inline", calibrated=False)
    assert not frame.duplicated(subset=["tp", "pp", "dp", "zero", "micro_batch", "recompute", "schedule", "vpp"]).any()


def test_cli_a_search_that_finds_nothing_leaves_out_alone(tmp_path, capsys):
    out = tmp_path / "plans.csv"
    out.write_text("earlier results\n")
    assert run(BASE + ["--constraint", "max-memory=1MiB", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no plan fits" in err and "max-memory" in err
    assert out.read_text() == "earlier results\n"


def test_cli_global_batch_nothing_divides(capsys):
    argv = ["search", "--model", "tinyllama-1.1b", "--hardware", "a100-80gb", "--nodes", "641",
            "--gpus-per-node", "8", "--global-batch", "2520", "--workers", "1"]
    assert run(argv) == 2
    assert "max-global-batch" in capsys.readouterr().err


def test_rows_carry_the_clock_power_and_energy_of_the_power_model():
    frame = search("llama3-8b", "h100-sxm,a100-80gb", nodes=1, gpus_per_node=8, global_batch=64, seq_len=4096,
                   top=None)
    h100, a100 = frame[frame.hardware == "h100-sxm"], frame[frame.hardware == "a100-80gb"]
    assert len(h100) and len(a100)
    assert ((h100.sm_clock > 0) & (h100.sm_clock <= 1)).all()
    tokens = h100.global_batch * h100.seq_len
    assert (abs(h100.energy_per_token_j - h100.power_w * h100.num_gpus * h100.step_time_s / tokens)
            <= 1e-9 * h100.energy_per_token_j).all()
    assert a100.sm_clock.isna().all() and a100.power_w.isna().all()  # no power data for the A100


def test_confirmed_rows_are_what_simulate_gives():
    """A row the search event-simulated is plansim.simulate's answer for that plan: the search
    calibrates the cluster as simulate does (the H200's fitted NVLink included; it used to take
    the device's parameters only, and ran H200 plans 1-2 % fast)."""
    import plansim
    frame = search("tinyllama-1.1b", "h200", nodes=1, gpus_per_node=8, global_batch=32, seq_len=2048, top=3,
                   executor="inline")
    for _, row in frame[frame["evaluated"] == "event"].iterrows():
        result = plansim.simulate("tinyllama-1.1b", "h200", nodes=1, gpus_per_node=8, plan=row["plan"])
        assert row["step_time_s"] == pytest.approx(result.step_time_s, rel=1e-9)


def test_search_refuses_a_precision_no_device_can_run():
    with pytest.raises(PlanError, match="precision: fp8 needs fp8 tensor cores, which a100-80gb lacks"):
        search("tinyllama-1.1b", "a100-80gb", nodes=1, gpus_per_node=8, global_batch=32, executor="inline",
               precision="fp8")


def test_etp_is_a_constraint_key():
    frame = search("mixtral-8x7b", "h100-sxm", nodes=2, gpus_per_node=8, global_batch=64, seq_len=2048, top=None,
                   executor="inline", constraints=["etp=1", "tp=2"], calibrated=False, space=SMALL)
    assert not frame.empty and set(frame["etp"]) == {1} and set(frame["tp"]) == {2}


def test_offloading_the_optimizer_keeps_the_exhaustive_winner():
    """Llama 3 8B on 2 H100s: its 16 bytes per parameter leave no room for activations at 8k
    tokens unless the optimizer goes to the host or the plan recomputes.  With ``optimizer_tiers``
    gpu and cpu the search's winner is exhaustive event simulation's best over both placements,
    offloaded plans whose on-GPU twin fits are dropped as dominated, and where nothing fits on the
    GPU alone an offloaded plan does."""
    model = load_model("llama3-8b")
    space = SearchSpace(micro_batch=(1, 2), max_vpp=2, recompute=("none", "full"), optimizer_tiers=("gpu", "cpu"))
    cluster = build_cluster("h100-sxm", None, 1, 2)
    plans = enumerate_plans(model, cluster, space, seq_len=8192, global_batch=8).plans
    results = [simulate_task(model, cluster, p) for p in plans]
    best = max(r["tokens_per_s"] for r in results if r["fits"])
    frame = search(model, hardware="h100-sxm", nodes=1, gpus_per_node=2, global_batch=8, seq_len=8192, top=None,
                   executor="inline", calibrated=False, space=space, confirm=3, list_infeasible=True)
    assert frame.iloc[0]["tokens_per_s"] == pytest.approx(best, rel=1e-9)
    assert set(frame["optimizer_tier"]) == {"gpu", "cpu"}
    layout = ["tp", "pp", "dp", "zero", "micro_batch", "recompute", "schedule", "vpp"]
    on_gpu = {tuple(r) for r in frame[frame["optimizer_tier"] == "gpu"][layout].itertuples(index=False)}
    offloaded = {tuple(r) for r in frame[frame["optimizer_tier"] == "cpu"][layout].itertuples(index=False)}
    assert on_gpu and offloaded and not on_gpu & offloaded  # an offloaded twin of a fitting plan is dominated
    one = search(model, hardware="h100-sxm", nodes=1, gpus_per_node=1, global_batch=8, seq_len=8192,
                 executor="inline", calibrated=False, space=space)
    assert not one.empty and (one["optimizer_tier"] == "cpu").all()
    gpu_only = search(model, hardware="h100-sxm", nodes=1, gpus_per_node=1, global_batch=8, seq_len=8192,
                      executor="inline", calibrated=False, space=SearchSpace(micro_batch=(1, 2), max_vpp=2))
    assert gpu_only.empty and "out of memory" in gpu_only.attrs["why_empty"]


@pytest.mark.parametrize("cap_gib", [12, 24])
def test_activation_offload_keeps_the_exhaustive_winner(cap_gib):
    """TinyLlama at 16k tokens on 2 H100s under a memory cap, each plan also with its activations
    in host memory: the search's winner is exhaustive event simulation's best (its offload
    estimates err fast and its peaks low, so it simulates them rather than dropping them), and
    the plans it confirms fit the cap as simulated."""
    space = SearchSpace(micro_batch=(1, 2), max_vpp=2, recompute=("none", "full"), activation_offload=True)
    cluster = build_cluster("h100-sxm", None, 1, 2)
    cap = cap_gib * 2**30
    plans = enumerate_plans(MODEL, cluster, space, seq_len=16384, global_batch=4).plans
    assert any(p.offload.get("activations") == "cpu" for p in plans)
    results = [simulate_task(MODEL, cluster, p) for p in plans]
    best = max(r["tokens_per_s"] for r in results if r["fits"] and r["peak_memory_bytes"] <= cap)
    frame = small_search(gpus_per_node=2, global_batch=4, seq_len=16384, space=space, confirm=3,
                         constraints=[f"max-memory={cap_gib}GiB"])
    assert frame.iloc[0]["evaluated"] == "event"
    assert frame.iloc[0]["tokens_per_s"] == pytest.approx(best, rel=1e-9)
    confirmed = frame.head(3)
    assert (confirmed["evaluated"] == "event").all() and (confirmed["peak_memory_bytes"] <= cap).all()
