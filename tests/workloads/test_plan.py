"""Plan: frozen, validated on construction, errors that name field, value and what is allowed."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings, strategies as st

from plansim.workloads.model_io import load_model
from plansim.workloads.plan import ATTENTION, CROSS_ENTROPY, PRECISIONS, RECOMPUTE, SCHEDULES, Plan, PlanError
from plansim.workloads.training import TrainingWorkload, check_plan_fits_model


def test_defaults_are_a_single_gpu_plan():
    p = Plan()
    assert p.world_size == 1 and p.num_microbatches == 1 and p.sequence_parallel is False
    assert p.tokens_per_step == p.global_batch * p.seq_len


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Plan().tp = 2  # type: ignore[misc]


def test_sequence_parallel_on_by_default_with_tp():
    assert Plan(tp=2).sequence_parallel is True
    assert Plan(tp=2, sequence_parallel=False).sequence_parallel is False
    assert Plan(tp=1).sequence_parallel is False


def test_derived_quantities():
    p = Plan(tp=8, pp=8, dp=16, cp=2, micro_batch=2, global_batch=1536, seq_len=4096)
    assert p.world_size == 8 * 8 * 16 * 2
    assert p.num_microbatches == 1536 // (16 * 2)
    assert p.tokens_per_step == 1536 * 4096


@pytest.mark.parametrize("field", ["tp", "pp", "dp", "cp", "ep", "micro_batch", "global_batch", "seq_len", "vpp"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_sizes_must_be_positive_integers(field, value):
    with pytest.raises(PlanError) as err:
        Plan(**{field: value})
    msg = str(err.value)
    assert msg.startswith(f"{field}:") and "positive integer" in msg and repr(value) in msg


@pytest.mark.parametrize("field, value, allowed", [
    ("recompute", "some", RECOMPUTE), ("schedule", "pipedream", SCHEDULES),
    ("precision", "fp4", PRECISIONS), ("attention", "sparse", ATTENTION), ("cross_entropy", "liger", CROSS_ENTROPY)])
def test_choices_name_the_allowed_values(field, value, allowed):
    with pytest.raises(PlanError) as err:
        Plan(**{field: value})
    msg = str(err.value)
    assert msg.startswith(f"{field}:") and repr(value) in msg
    assert all(a in msg for a in allowed)


@pytest.mark.parametrize("kw, match", [
    (dict(zero=4), r"zero: must be one of 0, 1, 2, 3, got 4"),
    (dict(vpp=2), r"vpp: 2 needs schedule 'interleaved'"),
    (dict(dp=4, ep=3, global_batch=4), r"ep: 3 must divide dp·cp = 4"),
    (dict(dp=4, micro_batch=2, global_batch=12), r"global_batch: 12 is not a multiple of dp·micro_batch"),
    (dict(cp=3, seq_len=1000), r"cp: 3 must divide seq_len 1000"),
    (dict(offload={"kv": "cpu"}), r"offload: 'kv' is not one of"),
    (dict(offload={"optimizer": "tape"}), r"offload.optimizer: 'tape' is not one of gpu, cpu, nvme, cxl"),
    (dict(pp=4, vpp=2, schedule="interleaved", global_batch=6), r"multiple of pp \(4\)"),
    (dict(pp=4, microbatch_group=4, global_batch=8), r"microbatch_group: applies to the interleaved schedule"),
    (dict(pp=4, vpp=2, schedule="interleaved", global_batch=6, microbatch_group=3), r"between pp \(4\) and"),
    (dict(pp=4, vpp=2, schedule="interleaved", global_batch=6, microbatch_group=7), r"between pp \(4\) and .*\(6\)"),
    (dict(pp=4, vpp=2, schedule="interleaved", global_batch=10, microbatch_group=4), r"last group of 2"),
    (dict(pp=4, vpp=2, schedule="interleaved", global_batch=10, microbatch_group=0), r"microbatch_group: .*positive"),
])
def test_inconsistent_plans_are_rejected_with_a_reason(kw, match):
    with pytest.raises(PlanError, match=match):
        Plan(**kw)


def test_from_dict_round_trip_and_unknown_field():
    p = Plan(tp=2, pp=2, dp=2, global_batch=8, recompute="selective", offload={"optimizer": "cpu"})
    assert Plan.from_dict(p.to_dict()) == p
    with pytest.raises(PlanError, match=r"plan: unknown field 'tensor_parallel'; allowed: .*tp"):
        Plan.from_dict({"tensor_parallel": 2})


def test_replace_validates():
    with pytest.raises(PlanError, match="tp"):
        Plan().replace(tp=0)
    assert Plan().replace(tp=4).sequence_parallel is False  # already resolved on the original


@pytest.mark.parametrize("kw, match", [
    (dict(tp=3), r"tp: 3 must divide the number of attention heads 32"),
    (dict(tp=64), r"tp: 64 must divide the number of attention heads 32"),
    (dict(pp=33), r"pp: pp·vpp = 33 exceeds the 32 layers"),
    (dict(ep=2, dp=2, global_batch=2), r"ep: 2 needs a mixture-of-experts model; .* is dense"),
])
def test_plan_must_fit_the_model(kw, match):
    with pytest.raises(PlanError, match=match):
        check_plan_fits_model(load_model("llama3-8b"), Plan(**kw))


def test_kv_heads_and_tp_must_divide_one_another():
    llama70 = load_model("llama3-70b")  # 64 heads, 8 kv heads
    check_plan_fits_model(llama70, Plan(tp=16, sequence_parallel=False))  # kv heads replicated
    spec = dataclasses.replace(llama70, num_kv_heads=16, num_heads=48, head_dim=128)
    with pytest.raises(PlanError, match="key/value heads 16"):
        check_plan_fits_model(spec, Plan(tp=12, sequence_parallel=False))


@settings(max_examples=60, deadline=None)
@given(tp=st.sampled_from([1, 2, 4, 8]), pp=st.integers(1, 8), dp=st.integers(1, 16), mb=st.integers(1, 4),
       m=st.integers(1, 16))
def test_microbatches_times_dp_times_mb_is_the_global_batch(tp, pp, dp, mb, m):
    p = Plan(tp=tp, pp=pp, dp=dp, micro_batch=mb, global_batch=dp * mb * m)
    assert p.num_microbatches * p.dp * p.micro_batch == p.global_batch
    assert p.world_size == tp * pp * dp
    w = TrainingWorkload(load_model("llama3-8b"), p)
    assert sum(c.num_layers for c in w.chunks) == 32


def test_microbatch_groups_admit_what_megatron_core_admits():
    """Megatron-Core's interleaved schedule (schedules.py, 2024 on): micro-batches in groups of
    N, pp ≤ N ≤ m, the last group empty or of at least pp; 10 micro-batches on 4 stages run as
    groups of 5, of 6 then 4, or one of 10, not of 4 (a last group of 2) or 7 (a last of 3)."""
    ok = [n for n in range(1, 12) if _admits(pp=4, m=10, n=n)]
    assert ok == [5, 6, 10]
    # 12: groups 7 + 5 and 8 + 4 too; not 9, 10 or 11 (last groups of 3, 2, 1)
    assert [n for n in range(1, 14) if _admits(pp=4, m=12, n=n)] == [4, 6, 7, 8, 12]


def _admits(pp: int, m: int, n: int) -> bool:
    try:
        Plan(pp=pp, vpp=2, schedule="interleaved", global_batch=m, microbatch_group=n)
    except PlanError:
        return False
    return True
