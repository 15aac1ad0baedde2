"""Suite gpt2021: the GPT config plansim reads, the torch model's size, the stored rows, a CPU smoke run."""
from __future__ import annotations

import csv
import pathlib

import pytest

from plansim.validation.runner.common import COLUMNS, split_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "validation" / "runner" / "configs" / "gpt-1.7b.json"
DATA = ROOT / "validation" / "data" / "h100-x1"
NEW_KINDS = {"bmm", "softmax", "masked_softmax", "dropout", "dropout_add", "gelu", "bias_gelu"}


def _rows(suite):
    with open(DATA / f"{suite}.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_plansim_reads_the_gpt_config_as_megatrons_1_7b():
    from plansim.workloads.model_io import load_model

    spec = load_model(str(CONFIG))
    assert (spec.num_layers, spec.hidden, spec.num_heads, spec.ffn_hidden, spec.vocab, spec.max_seq_len) == \
        (24, 2304, 24, 4 * 2304, 51200, 2048)
    assert (spec.mlp, spec.norm, spec.position, spec.tied_embeddings, spec.bias) == \
        ("gelu", "layernorm", "learned", True, True)
    # Narayanan et al. SC'21: P = 12·l·h²·(1 + 13/(12h) + (V + s)/(12·l·h)) = 1.652 B
    assert spec.num_params == 1_652_230_656


def test_the_torch_model_has_plansims_parameter_count():
    torch = pytest.importorskip("torch")
    from plansim.validation.runner.gpt_model import GPT, GPTConfig
    from plansim.workloads.model_io import load_model

    cfg = GPTConfig.from_hf(str(CONFIG))
    with torch.device("meta"):
        model = GPT(cfg)
    n = sum(p.numel() for p in model.parameters())  # tied: the LM head is wte
    assert n == cfg.n_params() == load_model(str(CONFIG)).num_params
    assert (cfg.approximate, cfg.dropout) == ("tanh", 0.1)


def test_stored_gpt2021_rows():
    kernels = [r for r in _rows("kernels") if r["kind"] in NEW_KINDS]
    assert {r["kind"] for r in kernels} == NEW_KINDS
    for r in kernels:
        assert r["status"] == "ok" and r["split"] == split_for("kernels", r["case_id"])
        t = float(r["time_s"])
        if r["kind"] == "bmm":
            m, n, k, b = (int(r[c]) for c in ("m", "n", "k", "batch"))
            assert int(r["flops"]) == 2 * b * m * n * k
            assert float(r["tflops"]) == pytest.approx(2 * b * m * n * k / t / 1e12)
        else:
            assert float(r["gbps"]) == pytest.approx(int(r["bytes_moved"]) / t / 1e9)
    steps = [r for r in _rows("steps") if r["model"] == "gpt-1.7b"]
    assert len(steps) == 5
    assert {r["attn_impl"] for r in steps} == {"unfused"}
    assert {r["recompute"] for r in steps} == {"none", "full"}
    assert any(int(r["num_microbatches"]) > 1 for r in steps)
    assert all(r["status"] == "ok" and r["n_params"] == "1652230656" for r in steps)


def test_step_plan_takes_unfused_attention_from_the_row():
    from plansim.validation.compare import step_plan

    row = dict(tp=1, pp=1, dp=1, strategy="single", micro_batch=2, global_batch=2, seq_len=2048,
               recompute="none", schedule="-")
    assert step_plan(dict(row, attn_impl="unfused")).attention == "unfused"
    assert step_plan(dict(row, attn_impl="flash-gqa")).attention == "flash"


def test_gpt2021_suite_runs_on_cpu(tmp_path):
    pytest.importorskip("torch")
    from plansim.validation.runner import measure

    paths = measure("gpt2021", str(tmp_path), quick=True, device="cpu", log=lambda m: None)
    assert {pathlib.Path(p).name for p in paths} == {"kernels_gpt.csv", "steps_gpt.csv", "provenance.json"}
    for name, suite in (("kernels_gpt", "kernels"), ("steps_gpt", "steps")):
        with open(tmp_path / f"{name}.csv", newline="") as fh:
            r = csv.DictReader(fh)
            assert tuple(r.fieldnames) == COLUMNS[suite]
            rows = list(r)
        assert rows and all(x["status"] == "ok" for x in rows), rows
