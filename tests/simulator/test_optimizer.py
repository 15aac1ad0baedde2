"""The optimizer step's HBM traffic, counted kernel by kernel from the code that runs it."""
import pytest

from plansim.simulator.memory import optimizer_step_bytes
from plansim.workloads.plan import Plan

PARAMS, SHARD = 1e9, 1e9 / 8


@pytest.mark.parametrize("precision,fp32_grads,per_shard,per_param", [
    # Megatron, fp32 main grads: norm 4 + Adam 28 + master->model copy 6; zero the fp32 buffer 4
    ("bf16-mixed", True, 4 + 28 + 6, 4),
    # 16-bit grads: + copy into fp32 (read 2, write 4); zero the 16-bit buffer 2
    ("bf16-mixed", False, 6 + 4 + 28 + 6, 2),
    # fp16 with loss scaling: + unscale and inf check (read 4, write 4)
    ("fp16-mixed", False, 6 + 8 + 4 + 28 + 6, 2),
    ("bf16-pure", False, 14, 0),
])
def test_megatron_optimizer_bytes(precision, fp32_grads, per_shard, per_param):
    plan = Plan(dp=8, zero=1, global_batch=8, precision=precision, fp32_grads=fp32_grads)
    assert optimizer_step_bytes(plan, PARAMS, SHARD) == pytest.approx(per_shard * SHARD + per_param * PARAMS)


def test_pytorch_fused_adamw_is_one_pass():
    plan = Plan(framework="pytorch", precision="bf16-mixed")
    assert optimizer_step_bytes(plan, PARAMS, PARAMS) == pytest.approx(28 * PARAMS)


def test_more_sharding_never_costs_more():
    plan = Plan(dp=8, zero=1, global_batch=8)
    assert optimizer_step_bytes(plan, PARAMS, PARAMS / 8) < optimizer_step_bytes(plan, PARAMS, PARAMS)
