"""One H100 step's kernel time by class (validation/data/h100-x1/profile, suite ``profile``): the
stored data is physical, and the cost model's GEMM and attention time for these steps agree with
the profiled kernels, which locates the steps' remaining error in the work around them."""
from pathlib import Path

import pandas as pd
import pytest

from plansim.simulator.stagecost import Groups, cost_ops
from plansim.validation import compare as C
from plansim.workloads.model_io import load_model
from plansim.workloads.plan import Plan
from plansim.workloads.training import TrainingWorkload

DATA = Path(__file__).resolve().parents[2] / "validation" / "data" / "h100-x1" / "profile" / "profile.csv"


@pytest.fixture(scope="module")
def profile():
    return pd.read_csv(DATA)


@pytest.mark.parametrize("path", [DATA, DATA.parents[2] / "bigsteps-h200-x1" / "profile" / "profile.csv"],
                         ids=lambda p: p.parts[-3])
def test_busy_time_never_exceeds_the_step(path):
    for case, rows in pd.read_csv(path).groupby("case_id"):
        by = rows.set_index("klass")["seconds"]
        busy = by.drop(["step", "idle"]).sum()
        assert 0 < busy <= by["step"] * 1.001, case
        assert by["idle"] >= 0


def _predicted_by_kind(model: str, mb: int, recompute: str) -> dict[str, float]:
    cluster, _ = C.calibrated_cluster(C.DATA_DIR / "h100-x1", C.CALIBRATED_DIR, True)
    machine = cluster.model_copy(update={"gpus_per_node": 1, "nodes": 1})
    spec = load_model(C.CONFIGS_DIR / f"{model}.json")
    plan = Plan(micro_batch=mb, global_batch=mb, seq_len=2048, recompute=recompute, precision="bf16-pure",
                framework="pytorch", ddp="torch", sequence_parallel=False)
    w, groups, out = TrainingWorkload(spec, plan), Groups.of(plan, machine), {}
    for part, times in ((w.layer_ops(0), spec.num_layers), (w.embedding, 1), (w.head, 1)):
        for ops in w.phases(part).values():
            kinds = {op.name: op.kind for op in ops}
            for name, seconds, _ in cost_ops(ops, machine, groups).ops:
                kind = kinds.get(name, "host")  # host.issue: the GPU waiting for the host
                out[kind] = out.get(kind, 0.0) + seconds * times
    return out


@pytest.mark.parametrize("case", ["llama3.2-3b-untied-mb4-s2048-rcfull", "llama3.2-3b-untied-mb2-s2048-rcnone",
                                  "tinyllama-1.1b-mb4-s2048-rcnone"])
def test_gemm_and_attention_time_match_the_profiled_kernels(profile, case):
    rows = profile[profile.case_id == case]
    measured = rows.set_index("klass")["seconds"]
    r = rows.iloc[0]
    predicted = _predicted_by_kind(r["model"], int(r["micro_batch"]), r["recompute"])
    assert predicted["gemm"] == pytest.approx(measured["gemm"], rel=0.08)
    assert predicted["attention"] == pytest.approx(measured["attention"], rel=0.2)  # flash at mb 2: -15 %


def test_eager_rope_rate_is_the_measured_kernel_mix():
    """EAGER_ROPE_SM_RATE (workloads/training.py) from layout.csv on the H100 and the H200: RoPE's
    kernels on the transposed views the eager model feeds them, weighted by the bytes each moves,
    reach the same rate on both GPUs (SM-bound), far below an add on the H200."""
    from plansim.workloads.training import EAGER_ROPE_SM_RATE

    rates = {}
    for gpu in ("h100-x1", "h200-x1"):
        layout = pd.read_csv(DATA.parents[2] / gpu / "profile" / "layout.csv")
        strided = layout[layout.layout == "strided"].groupby("op").gbps.mean()
        mul, cat, add = strided["mul_broadcast"], strided["cat_halves"], strided["add"]
        assert mul < add and cat < add
        rates[gpu] = 10 / (5 / mul + 2 / cat + 3 / add) * 1e9
    # the H200's HBM is 43 % faster (4.8 vs 3.35 TB/s); these kernels gain at most a third of that
    assert rates["h200-x1"] / rates["h100-x1"] - 1 <= (4.8 / 3.35 - 1) / 3
    assert EAGER_ROPE_SM_RATE * 132 == pytest.approx(sum(rates.values()) / 2, rel=0.03)


def test_fused_adamw_rate_is_the_measured_mean_per_sm():
    """FUSED_ADAMW_SM_RATE (simulator/memory.py) from adamw.csv: PyTorch's fused AdamW gains far
    less than the H200's extra HBM bandwidth (both GPUs have 132 SMs)."""
    from plansim.simulator.memory import FUSED_ADAMW_SM_RATE

    rates = {gpu: pd.read_csv(DATA.parents[2] / gpu / "profile" / "adamw.csv").gbps.mean() * 1e9
             for gpu in ("h100-x1", "h200-x1")}
    assert rates["h200-x1"] / rates["h100-x1"] - 1 <= (4.8 / 3.35 - 1) / 2  # HBM grows 43 %, AdamW at most half
    assert FUSED_ADAMW_SM_RATE * 132 == pytest.approx(sum(rates.values()) / 2, rel=0.02)


def _gpt_kernels(gpu: str) -> pd.DataFrame:
    """The profiled kernels of the eager gpt-1.7b step at micro-batch 2 on one GPU's profile."""
    kernels = pd.read_csv(DATA.parents[2] / gpu / "profile_kernels.csv")
    return kernels[kernels.case_id == "gpt-1.7b-mb2-s2048-rcnone"]


def _layer_backward_bytes(spec, framework: str, name: str) -> float:
    """HBM bytes of one backward op of a layer of that step (micro-batch 2, unfused attention)."""
    plan = Plan(micro_batch=2, global_batch=2, seq_len=2048, attention="unfused", framework=framework)
    workload = TrainingWorkload(spec, plan)
    return sum(op.bytes for op in workload.phases(workload.dense_layer)["B"] if op.name == name)


def test_eager_masked_fill_rate_is_the_profiled_kernel():
    """EAGER_MASKED_FILL_SM_RATE (workloads/training.py) from the profiles of the eager 2021 GPT:
    its forward and backward ``masked_fill_`` on the [b, heads, s, s] scores, 4 bytes per element
    (read and write bf16), reach about the same rate on the H100 and the H200 (SM-bound), far
    below either GPU's HBM bandwidth."""
    from plansim.workloads.model_io import load_model
    from plansim.workloads.training import EAGER_MASKED_FILL_SM_RATE

    spec = load_model(C.CONFIGS_DIR / "gpt-1.7b.json")
    elements = 2 * spec.num_heads * 2048 ** 2 * spec.num_layers * 2  # forward and backward fills
    rates = {}
    for gpu in ("h100-x1/profile2", "h200-x2/profile"):
        case = _gpt_kernels(gpu)
        rates[gpu] = elements * 4 / case[case.kernel.str.contains("masked_fill_kernel")].seconds.sum()
    assert rates["h100-x1/profile2"] < 3.35e12 / 2 and rates["h200-x2/profile"] < 4.8e12 / 3
    assert rates["h200-x2/profile"] / rates["h100-x1/profile2"] - 1 <= (4.8 / 3.35 - 1) / 3  # HBM +43 %, the fill far less
    assert EAGER_MASKED_FILL_SM_RATE * 132 == pytest.approx(rates["h200-x2/profile"], rel=0.02)  # not a held-out step
    assert EAGER_MASKED_FILL_SM_RATE * 132 == pytest.approx(rates["h100-x1/profile2"], rel=0.08)  # the same rate per SM


def test_eager_softmax_backward_multiply_is_in_the_op_graph():
    """The profiles' bf16 tensor-times-tensor multiply over the scores is eager softmax's
    ``tmp = grad * output`` (PyTorch's softmax_backward_cuda_out): it moves the same bytes as the
    softmax backward's reduction kernel after it, so it takes as long (within 10 %), and HBM-bound
    as that one is, it is faster on the H200.  Eager plans charge it in backward
    (SOFTMAX_GRAD_PRODUCT_BYTES per score); Megatron's fused softmax does not."""
    from plansim.workloads.model_io import load_model
    from plansim.workloads.training import SOFTMAX_GRAD_PRODUCT_BYTES

    times = {}
    for gpu in ("h100-x1/profile2", "h200-x2/profile"):
        case = _gpt_kernels(gpu)
        multiply = case[case.kernel.str.contains("BinaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, "
                                                 "at::native::binary_internal::MulFunctor", regex=False)].seconds.sum()
        reduction = case[case.kernel.str.contains("SoftMaxBackward")].seconds.sum()
        assert multiply == pytest.approx(reduction, rel=0.1), gpu
        times[gpu] = multiply
    assert times["h200-x2/profile"] < times["h100-x1/profile2"] / 1.25

    spec = load_model(C.CONFIGS_DIR / "gpt-1.7b.json")
    scores = 2 * spec.num_heads * 2048 ** 2
    extra = {framework: _layer_backward_bytes(spec, framework, "softmax.autograd")
             for framework in ("pytorch", "megatron")}
    assert extra == {"pytorch": SOFTMAX_GRAD_PRODUCT_BYTES * scores, "megatron": 0}


def test_copyslices_zero_fill_is_one_write_of_the_scores_per_layer():
    """The profiles' bf16 fill in gpt-1.7b's backward (3 ms per step) is one write of the
    [b, heads, s, s] gradient per layer (CopySlices' zero-filled buffer): at that size it runs at
    50-100 % of each GPU's datasheet HBM bandwidth, and the eager op graph charges it beside the
    four copies (``attn.mask.autograd``: 18 bytes per score, 2 read + 2 written per copy, 2 for
    the fill)."""
    from plansim.workloads.model_io import load_model
    from plansim.workloads.training import MASKED_FILL_VIEW_COPIES

    spec = load_model(C.CONFIGS_DIR / "gpt-1.7b.json")
    scores = 2 * spec.num_heads * 2048 ** 2
    for gpu, hbm in (("h100-x1/profile2", 3.35e12), ("h200-x2/profile", 4.8e12)):
        case = _gpt_kernels(gpu)
        fill = case[case.kernel.str.contains("FillFunctor<c10::BFloat16>", regex=False)].seconds.sum()
        assert 0.5 * hbm < 2 * scores * spec.num_layers / fill < hbm, gpu
    assert _layer_backward_bytes(spec, "pytorch", "attn.mask.autograd") == (MASKED_FILL_VIEW_COPIES * 4 + 2) * scores


def test_host_issue_rates_are_physical():
    """host.csv: the shrunk models keep the GPU mostly idle (so the wall time is the host's), and
    an eager kernel costs the host microseconds, not nanoseconds or milliseconds."""
    for folder in ("h100-x1/profile2", "h200-x2/profile"):
        host = pd.read_csv(DATA.parents[2] / folder / "host.csv")
        steps = host[host.phase.isin(["forward", "backward", "steady_step"])]
        assert (steps.busy_s < 0.5 * steps.wall_s).all()
        assert steps.s_per_kernel.between(2e-6, 100e-6).all()
