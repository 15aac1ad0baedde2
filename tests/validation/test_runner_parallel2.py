"""Suite parallel2: the MoE config plansim reads, the torch model's size, the stored rows, their
Plans, a CPU smoke run."""
from __future__ import annotations

import csv
import pathlib

import pytest

from plansim.validation.runner.common import COLUMNS

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "validation" / "runner" / "configs" / "mixtral-8x-2.4b.json"
DATA = ROOT / "validation" / "data" / "h200-x2"


def _rows():
    with open(DATA / "steps.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["strategy"] in ("ep", "cp")]


def test_plansim_reads_the_moe_config():
    from plansim.workloads.model_io import load_model

    spec = load_model(str(CONFIG))
    assert (spec.num_layers, spec.hidden, spec.num_heads, spec.ffn_hidden, spec.vocab) == (8, 2048, 16, 5632, 32000)
    assert (spec.num_experts, spec.top_k, spec.is_moe) == (8, 2, True)


def test_the_torch_moe_has_plansims_parameter_count():
    torch = pytest.importorskip("torch")
    from plansim.validation.runner.parallel2 import MoEBlock, MoEConfig
    from plansim.validation.runner.model import Transformer
    from plansim.workloads.model_io import load_model

    cfg = MoEConfig.named("mixtral-8x-2.4b")
    with torch.device("meta"):
        model = Transformer(cfg.base)
        model.layers = torch.nn.ModuleDict({str(i): MoEBlock(cfg, 0, 1, None) for i in range(cfg.base.layers)})
    n = sum(p.numel() for p in model.parameters())  # one rank holding every expert
    assert n == cfg.n_params() == load_model(str(CONFIG)).num_params == 2_446_493_696


def test_stored_parallel2_rows():
    rows = _rows()
    assert {(r["strategy"], r["micro_batch"], r["seq_len"]) for r in rows} == {
        ("ep", "2", "2048"), ("ep", "4", "2048"), ("cp", "1", "8192"), ("cp", "1", "16384")}
    for r in rows:
        assert r["status"] == "ok" and r["world_size"] == "2" and r["attn_impl"] == "flash-gqa"
        assert ("-dp2-ep2-" if r["strategy"] == "ep" else "-dp1-cp2-") in r["case_id"]


def test_step_plan_maps_ep_and_cp():
    pytest.importorskip("pandas")
    from plansim.validation.compare import step_plan

    plans = {r["strategy"]: step_plan(r) for r in _rows()}
    ep, cp = plans["ep"], plans["cp"]
    assert (ep.dp, ep.ep, ep.cp, ep.world_size) == (2, 2, 1, 2)
    assert (cp.dp, cp.ep, cp.cp, cp.cp_comm, cp.world_size) == (1, 1, 2, "allgather", 2)
    for p in (ep, cp):
        assert (p.framework, p.ddp, p.precision, p.attention, p.sequence_parallel) == \
            ("pytorch", "torch", "bf16-pure", "flash", False)


def test_parallel2_suite_runs_on_cpu(tmp_path):
    pytest.importorskip("torch")
    from plansim.validation.runner import measure

    paths = measure("parallel2", str(tmp_path), quick=True, device="cpu", log=lambda m: None)
    assert {pathlib.Path(p).name for p in paths} == {"steps_parallel2.csv", "provenance.json"}
    with open(tmp_path / "steps_parallel2.csv", newline="") as fh:
        r = csv.DictReader(fh)
        assert tuple(r.fieldnames) == COLUMNS["steps"]
        rows = list(r)
    assert {x["strategy"] for x in rows} == {"ep", "cp"}
    assert all(x["status"] == "ok" for x in rows), rows
