"""Enumeration and pruning: every listed plan is well formed, every pruned one says why."""
from __future__ import annotations

import pytest

from plansim.planner.space import (Constraint, SearchSpace, enumerate_plans, parse_constraints,
                                   smallest_microbatch_group)
from plansim.simulator.hardware import build_cluster
from plansim.workloads.model_io import load_model
from plansim.workloads.plan import PlanError
from plansim.workloads.training import TrainingWorkload, check_plan_fits_model

MODEL = load_model("llama3-8b")
CLUSTER = build_cluster("h100-sxm", None, 2, 8)


def test_plans_are_well_formed_and_cover_the_gpus():
    e = enumerate_plans(MODEL, CLUSTER, SearchSpace(), seq_len=4096, global_batch=64)
    assert e.plans
    for p in e.plans:
        assert p.world_size == 16
        assert p.tp <= 8 and MODEL.num_heads % p.tp == 0
        assert p.global_batch == 64 and p.global_batch % (p.dp * p.micro_batch) == 0
        if p.schedule == "interleaved":
            assert -MODEL.num_layers % (p.pp * p.vpp) <= 2
            assert p.num_microbatches % p.pp == 0 or p.microbatch_group is not None
        check_plan_fits_model(MODEL, p)
    assert e.explored == len(e.plans) + sum(x.count for x in e.pruned)


def test_pruned_subtrees_carry_reasons():
    e = enumerate_plans(MODEL, CLUSTER, SearchSpace(), seq_len=4096, global_batch=48)
    assert e.pruned
    for x in e.pruned:
        assert x.reason and ":" in x.reason and x.count >= 1
    assert any(x.category == "global_batch" for x in e.pruned)


def test_interleaving_from_a_minimum_pipeline_size():
    """Megatron-LM of 2021-2024 ran the interleaved schedule only with pp > 2: with
    ``interleaved_min_pp=3`` no pp = 2 plan interleaves, and the other pp = 2 plans stay."""
    def pp2(space):
        plans = enumerate_plans(MODEL, CLUSTER, space, seq_len=4096, global_batch=64).plans
        return {p.schedule for p in plans if p.pp == 2}, {p.schedule for p in plans if p.pp == 4}

    assert pp2(SearchSpace()) == ({"1f1b", "interleaved", "zero-bubble"},) * 2
    assert pp2(SearchSpace(interleaved_min_pp=3)) == ({"1f1b", "zero-bubble"}, {"1f1b", "interleaved", "zero-bubble"})


def test_op_level_recompute_is_searched_with_pytorch_only():
    """torchtitan's op-level selective AC exists under framework "pytorch"; Megatron plans never
    carry it (the Plan would refuse them), PyTorch plans try it beside the other three."""
    def policies(**defaults):
        space = SearchSpace(plan_defaults=defaults)
        return {p.recompute for p in enumerate_plans(MODEL, CLUSTER, space, seq_len=4096, global_batch=64).plans}

    assert policies() == {"none", "selective", "full"}
    assert policies(framework="pytorch") == {"none", "selective", "full", "selective-op"}


def test_max_global_batch_takes_the_largest_multiple():
    e = enumerate_plans(MODEL, CLUSTER, SearchSpace(), seq_len=4096, max_global_batch=50)
    for p in e.plans:
        unit = p.dp * p.micro_batch * (p.pp if p.schedule == "interleaved" else 1)
        assert p.global_batch <= 50 and p.global_batch + unit > 50


def test_constraints_prune_with_reason():
    cons = parse_constraints(["tp<=2", "pp=1", "schedule!=zero-bubble"])
    e = enumerate_plans(MODEL, CLUSTER, SearchSpace(), seq_len=4096, global_batch=64, constraints=cons)
    assert e.plans and all(p.tp <= 2 and p.pp == 1 and p.schedule != "zero-bubble" for p in e.plans)
    assert any(x.reason.startswith("constraint: tp<=2") for x in e.pruned)


@pytest.mark.parametrize("text, key, op, value", [
    ("tp<=8", "tp", "<=", 8), ("pp = 1", "pp", "=", 1), ("max-memory=70GiB", "memory", "<=", 70 * 2**30),
    ("micro-batch>=2", "micro_batch", ">=", 2), ("recompute!=full", "recompute", "!=", "full"),
])
def test_constraint_parsing(text, key, op, value):
    c = Constraint.parse(text)
    assert (c.key, c.op, c.value) == (key, op, value)


@pytest.mark.parametrize("text", ["tp~8", "flux<=3", "tp<=eight", "recompute<=full", "max-memory=lots",
                                  "schedule=sideways"])
def test_bad_constraints_are_one_line_plan_errors(text):
    with pytest.raises(PlanError) as exc:
        Constraint.parse(text)
    assert "\n" not in str(exc.value) and str(exc.value).startswith("constraint:")


def test_interleaving_counts_embedding_and_loss_as_layers():
    """Llama 3 405B's 126 layers split evenly over no pp·vpp; Megatron-Core's recipes interleave
    them anyway, the first and last virtual stages one layer short (its
    ``account_for_embedding_in_pipeline_split`` / ``account_for_loss_in_pipeline_split``).  The
    search tries those splits (vpp 2 and 4 on 16 stages: 128 = 16·2·4 = 16·4·2; not vpp 8, whose
    first chunk would be empty) unless asked for even splits only."""
    model = load_model("llama3-405b")
    cluster = build_cluster("h100-sxm", None, 256, 8)
    cons = parse_constraints(["tp=8", "pp=16", "cp=1", "micro-batch=1", "zero=1", "recompute=none"])

    def vpps(space):
        plans = enumerate_plans(model, cluster, space, seq_len=8192, global_batch=2048, constraints=cons).plans
        return sorted(p.vpp for p in plans if p.schedule == "interleaved")

    assert vpps(SearchSpace()) == [2, 4]
    assert vpps(SearchSpace(even_layers=True)) == []
    plan = next(p for p in enumerate_plans(model, cluster, SearchSpace(), seq_len=8192, global_batch=2048,
                                           constraints=cons).plans if p.vpp == 4)
    counts = [c.num_layers for c in TrainingWorkload(model, plan).chunks]
    assert counts[0] == counts[-1] == 1 and set(counts[1:-1]) == {2} and sum(counts) == 126


def test_pinned_constraints_widen_the_space():
    """``cp=16`` and ``micro-batch=32`` name values the default space stops short of (cp up to 8 at
    8k tokens, micro-batches up to 16): the search tries them rather than calling the constraint
    impossible.  Longer sequences widen the default cp range (up to seq / 8192)."""
    cons = parse_constraints(["cp=16", "micro-batch=32", "tp=1", "pp=1"])
    cluster = build_cluster("h100-sxm", None, 4, 8)
    e = enumerate_plans(MODEL, cluster, SearchSpace(), seq_len=8192, global_batch=64, constraints=cons)
    assert e.plans and {(p.cp, p.micro_batch) for p in e.plans} == {(16, 32)}
    wide = enumerate_plans(MODEL, cluster, SearchSpace(), seq_len=262144, global_batch=2,
                           constraints=parse_constraints(["tp=1", "pp=1"]))
    assert max(p.cp for p in wide.plans) == 32


def test_interleaving_in_micro_batch_groups():
    """24 micro-batches on 16 stages: Megatron-LM before 2024 could not interleave them; Megatron-
    Core groups them (N = 24, one group; 16 would leave a last group of 8 < 16).  The search takes
    the smallest group, and with ``microbatch_groups=False`` prunes such plans with the reason."""
    cluster = build_cluster("h100-sxm", None, 8, 8)
    cons = parse_constraints(["tp=4", "pp=16", "micro-batch=1", "recompute=none", "schedule=interleaved"])
    e = enumerate_plans(MODEL, cluster, SearchSpace(), seq_len=4096, global_batch=24, constraints=cons)
    assert e.plans and {(p.num_microbatches, p.microbatch_group) for p in e.plans} == {(24, 24)}
    off = enumerate_plans(MODEL, cluster, SearchSpace(microbatch_groups=False), seq_len=4096, global_batch=24,
                          constraints=cons)
    assert not off.plans and any("multiple of pp" in x.reason for x in off.pruned)
    assert smallest_microbatch_group(10, 4) == 5 and smallest_microbatch_group(12, 4) == 4
    assert smallest_microbatch_group(3, 4) is None


def test_tensor_parallelism_leaves_the_node_only_when_asked():
    """TP stays inside one NVLink domain (8 GPUs here) unless the space allows more
    (``tp_within_node=False``, the CLI's --tp-across-nodes) or a constraint names the degree."""
    cluster = build_cluster("h100-sxm", None, 2, 8)

    def tps(space, cons=()):
        return {p.tp for p in enumerate_plans(MODEL, cluster, space, seq_len=4096, global_batch=64,
                                              constraints=parse_constraints(list(cons))).plans}

    assert max(tps(SearchSpace())) == 8
    assert 16 in tps(SearchSpace(tp_within_node=False))
    assert tps(SearchSpace(), ["tp=16"]) == {16}
