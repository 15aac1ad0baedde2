from pathlib import Path

import pytest

from plansim.simulator import hardware as hw
from plansim.simulator.hardware import (ProfileError, build_cluster, list_profiles, load_cluster_spec,
                                        load_device, load_link, profile_names, resolve_cluster)

REQUIRED_DEVICES = ["h100-sxm", "h200", "a100-80gb", "a100-40gb", "b200", "mi300x", "mi250x",
                    "mi250x-gcd", "ascend-910b"]
ALL = [(k, n) for k in hw.KINDS for n in profile_names(k)]


@pytest.mark.parametrize("kind,name", ALL)
def test_every_builtin_profile_loads(kind, name):
    p = hw.load_profile(kind, name)
    assert p.name == name and p.description


def test_required_names_exist():
    assert set(REQUIRED_DEVICES) <= set(profile_names("devices"))
    assert any(hw.load_device(n).kind == "npu" and "laptop" in hw.load_device(n).description
               for n in profile_names("devices"))
    for c in ["dgx-a100", "dgx-h100", "dgx-h200", "dgx-b200", "mi300x-node", "ascend-910b-node", "laptop"]:
        resolve_cluster(c)


@pytest.mark.parametrize("name", profile_names("devices"))
def test_device_numbers(name):
    d = load_device(name)
    assert d.achievable_hbm_bw_Bps <= d.hbm_bw_Bps
    assert 0 < d.achievable_gemm_fraction <= 1 and 0 < d.attention_fraction <= 1
    assert d.peak_flops["bf16"] >= d.peak_flops.get("fp32", 0)
    assert d.peak_flops.get("fp8", d.peak_flops["bf16"]) >= d.peak_flops["bf16"]
    assert d.default_cluster in profile_names("clusters")
    spec = load_cluster_spec(d.default_cluster)
    # the default cluster must be usable with this device
    assert build_cluster(hardware=name).device == d
    assert spec.device in profile_names("devices")


@pytest.mark.parametrize("name", profile_names("links"))
def test_links_achievable_below_peak(name):
    link = load_link(name)
    assert link.achievable_bw_Bps <= link.bw_Bps and link.latency_s > 0


@pytest.mark.parametrize("name", profile_names("storage"))
def test_storage_achievable_below_peak(name):
    s = hw.load_storage(name)
    assert s.effective_read_bw_Bps <= s.read_bw_Bps and s.effective_write_bw_Bps <= s.write_bw_Bps


def test_known_values():
    h100 = load_device("h100-sxm")
    assert h100.peak_flops["bf16"] == pytest.approx(989.4e12)
    assert h100.hbm_bw_Bps == pytest.approx(3.35e12)
    assert h100.compute_units == 132
    assert load_device("a100-80gb").compute_units == 108
    assert load_device("mi300x").compute_units == 304
    assert load_link("ib-hdr").bw_Bps == pytest.approx(25e9)   # 200 Gb/s
    assert load_link("nvlink4-nvswitch").achievable_bw_Bps == pytest.approx(370e9)
    assert not load_link("infinity-fabric").switched


def test_clusters_are_hashable_and_cached():
    a = build_cluster("h100-sxm", nodes=4)
    b = build_cluster("h100-sxm", nodes=4)
    assert a is b
    assert hash(a) == hash(build_cluster.__wrapped__("h100-sxm", nodes=4))
    assert a == build_cluster.__wrapped__("h100-sxm", nodes=4)
    assert {a: 1}[b] == 1
    with pytest.raises(Exception):
        a.nodes = 3  # frozen


def test_build_cluster_defaults_and_overrides():
    base = build_cluster()
    assert base.device.name == "h100-sxm" and base.num_gpus == 8
    c = build_cluster(hardware="h100-sxm", nodes=64, gpus_per_node=8)
    assert c.num_gpus == 512 and c.intra_node_link.name == "nvlink4-nvswitch"
    assert c.inter_node_link.name == "ib-ndr" and c.topology == "rail-optimized"
    slow = build_cluster(hardware="h100-sxm", nodes=2, nics_per_node=4, nic_gbps=200)
    assert slow.nics_per_node == 4
    assert slow.inter_node_link.bw_Bps == pytest.approx(25e9)
    ndr = load_link("ib-ndr")
    assert slow.inter_node_link.achievable_bw_Bps == pytest.approx(ndr.achievable_bw_Bps / 2)
    assert slow.nic_bw_per_gpu_Bps == pytest.approx(ndr.achievable_bw_Bps / 2 * 4 / 8)
    # hardware swapped into another device's cluster
    c = build_cluster(hardware="a100-40gb")
    assert c.device.name == "a100-40gb" and c.intra_node_link.name == "nvlink3-nvswitch"
    c = build_cluster(hardware="h200", cluster="dgx-h100", gpus_per_node=4)
    assert c.device.name == "h200" and c.num_gpus == 4
    assert build_cluster(cluster="mi300x-node").intra_node_bw_per_gpu_Bps == pytest.approx(336e9)


def test_build_cluster_rejects():
    with pytest.raises(ProfileError, match="allowed: .*h100-sxm"):
        build_cluster(hardware="h900")
    with pytest.raises(ProfileError, match="allowed: .*dgx-h100"):
        build_cluster(cluster="dgx-z")
    with pytest.raises(ProfileError, match="nodes: must be positive"):
        build_cluster(nodes=0)
    with pytest.raises(ProfileError, match="nodes:"):
        build_cluster(cluster="laptop", nodes=2)


def test_list_profiles():
    df = list_profiles("devices")
    assert {"name", "kind", "description", "bf16", "memory"} <= set(df.columns)
    assert "h100-sxm" in set(df["name"])
    for kind in ["links", "hosts", "storage", "clusters", "all"]:
        assert len(list_profiles(kind)) > 0
    with pytest.raises(ProfileError):
        list_profiles("gizmos")


# ------------------------------------------------------------------ bad files

GOOD = (Path(hw.__file__).resolve().parent.parent / "hardware_profiles" / "devices" / "h100-sxm.yaml").read_text()


def _write(tmp_path, text, name="x.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _one_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_good_copy_loads(tmp_path):
    assert load_device(_write(tmp_path, GOOD, "copy.yaml")).name == "copy"


def test_negative_number(tmp_path):
    path = _write(tmp_path, GOOD.replace("hbm_bw: 3.35 TB/s", "hbm_bw: -1"))
    with pytest.raises(ProfileError) as e:
        load_device(path)
    assert _one_line(e) == f"{path}: hbm_bw: must be positive, got -1"


def test_missing_source(tmp_path):
    text = "\n".join(l for l in GOOD.splitlines() if not l.strip().startswith("l2: NVIDIA"))
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as e:
        load_device(path)
    assert _one_line(e) == f"{path}: sources: no source given for l2"


def test_unknown_field(tmp_path):
    path = _write(tmp_path, GOOD + "\nwarp_drive: 3\n")
    with pytest.raises(ProfileError) as e:
        load_device(path)
    assert _one_line(e).startswith(f"{path}: warp_drive: unknown field")


def test_wrong_unit(tmp_path):
    path = _write(tmp_path, GOOD.replace("hbm_bw: 3.35 TB/s", "hbm_bw: 3.35 GHz"))
    with pytest.raises(ProfileError) as e:
        load_device(path)
    msg = _one_line(e)
    assert msg.startswith(f"{path}: hbm_bw: unit 'GHz'")


def test_missing_field_and_wrong_type(tmp_path):
    path = _write(tmp_path, GOOD.replace("compute_units: 132\n", ""))
    with pytest.raises(ProfileError) as e:
        load_device(path)
    assert _one_line(e) == f"{path}: compute_units: required field missing"
    path = _write(tmp_path, GOOD.replace("compute_units: 132", "compute_units: many"), "y.yaml")
    with pytest.raises(ProfileError) as e:
        load_device(path)
    assert _one_line(e).startswith(f"{path}: compute_units:")


def test_achievable_above_peak(tmp_path):
    path = _write(tmp_path, GOOD.replace("achievable_hbm_bw: 3.0 TB/s", "achievable_hbm_bw: 4 TB/s"))
    with pytest.raises(ProfileError, match="achievable_hbm_bw: larger than"):
        load_device(path)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_device(_write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ProfileError, match="cannot read"):
        load_device(str(tmp_path / "nope.yaml"))
    with pytest.raises(ProfileError, match="expected a mapping"):
        load_device(_write(tmp_path, "- 1\n", "z.yaml"))


def test_unknown_dtype(tmp_path):
    path = _write(tmp_path, GOOD.replace("  fp32: 66.9 TFLOP/s", "  fp4: 66.9 TFLOP/s"))
    with pytest.raises(ProfileError, match="peak_flops: unknown dtype"):
        load_device(path)


def test_per_dtype_sources_accepted():
    d = hw.Device.model_validate({
        "name": "t", "vendor": "x", "peak_flops": {"bf16": "1 TFLOP/s"}, "hbm": "1 GiB", "hbm_bw": "1 TB/s",
        "achievable_hbm_bw": "0.5 TB/s", "achievable_gemm_fraction": 0.5, "compute_units": 1, "l2": "1 MiB",
        "kernel_launch": "1 us", "attention_fraction": 0.5,
        "sources": {"peak_flops.bf16": "a", "hbm": "a", "hbm_bw": "a", "achievable_hbm_bw": "a",
                    "achievable_gemm_fraction": "a", "compute_units": "a", "l2": "a", "kernel_launch": "a",
                    "attention_fraction": "a"}})
    assert d.hbm_bytes == 2**30 and d.flops("fp16") == 1e12  # fp16 falls back to bf16 ...
    with pytest.raises(ProfileError, match="'fp8' not supported"):  # ... fp8 never does
        d.flops("fp8")


def test_power_draws_below_idle_are_refused(tmp_path):
    text = GOOD.replace("\nsources:\n", "\nidle_power_w: 800\nsources:\n  idle_power_w: test\n", 1)
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as e:
        load_device(path)
    assert _one_line(e) == f"{path}: power_limit_w: 700.0 W must exceed idle_power_w (800.0 W)"


def test_a_device_of_the_same_die_borrows_its_kernel_rates_not_its_memory():
    """The A100 40GB is the 80GB part's GA100 with slower HBM: the 80GB part's calibrated GEMM rate
    applies to it (its datasheet guess made it ~10 % faster than the calibrated 80GB), its own HBM
    stays, and a step on it is never faster than on the 80GB part."""
    from plansim.api import simulate
    from plansim.simulator.calibration import apply_calibration
    big, source_big = apply_calibration(hw.load_device("a100-80gb"))
    small, source_small = apply_calibration(hw.load_device("a100-40gb"))
    assert small.achievable_gemm_fraction == big.achievable_gemm_fraction
    assert small.achievable_hbm_bw_Bps < big.achievable_hbm_bw_Bps
    assert "same die as a100-80gb" in source_small and "same die" not in source_big
    plan = dict(tp=2, zero=1, global_batch=16, seq_len=2048, recompute="full")
    steps = {name: simulate("llama3-8b", name, plan=plan, nodes=1, gpus_per_node=8).step_time_s
             for name in ("a100-40gb", "a100-80gb")}
    assert steps["a100-40gb"] >= steps["a100-80gb"]


def test_the_h100_96gb_borrows_its_die_and_draws_but_keeps_its_hbm_and_default_limit():
    """torchtitan's Grand Teton H100 is the SXM5 die with six HBM2e stacks at 2.4 TB/s and a 500 W
    default limit: the H100 80GB's calibrated kernel rates and power draws apply, its own memory
    and limit stay, so at 500 W a step takes longer than on the 700 W, 3.35 TB/s part."""
    from plansim.api import simulate
    from plansim.simulator.calibration import DIE_PARAMETERS, apply_calibration
    h100, _ = apply_calibration(hw.load_device("h100-sxm"))
    big, source = apply_calibration(hw.load_device("h100-sxm-96gb"))
    assert "same die as h100-sxm" in source
    for name in DIE_PARAMETERS:
        assert getattr(big, name) == getattr(h100, name), name
    assert big.achievable_hbm_bw_Bps < h100.achievable_hbm_bw_Bps and big.hbm_bytes > h100.hbm_bytes
    assert (big.power_limit_w, big.max_power_limit_w) == (500, 700)
    plan = dict(zero=3, ddp="torch", framework="pytorch", micro_batch=1, global_batch=8, seq_len=8192)
    steps = {name: simulate("llama3-8b", name, plan=plan, nodes=1, gpus_per_node=8).step_time_s
             for name in ("h100-sxm-96gb", "h100-sxm")}
    assert steps["h100-sxm-96gb"] > steps["h100-sxm"]


def test_the_h800_is_an_h100_with_less_nvlink():
    """The H800 (DeepSeek-V3's GPU) runs the H100 SXM die's calibrated kernels; only its NVLink
    is narrower (8 links, 160 GB/s as DeepSeek measured it): one GPU's step takes the same time
    on both, a TP-8 step longer on the H800."""
    from plansim.api import simulate

    def step(name: str, tp: int):
        plan = dict(tp=tp, micro_batch=1, global_batch=1, seq_len=2048)
        return simulate("llama3-8b", name, plan=plan, nodes=1, gpus_per_node=tp)

    one, eight = step("h800", 1), step("h800", 8)
    assert one.calibrated_profile.endswith("(die parameters: same die as h100-sxm)")
    assert eight.cluster.startswith("hgx-h800")
    assert one.step_time_s == pytest.approx(step("h100-sxm", 1).step_time_s, rel=1e-9)
    assert eight.step_time_s > 1.05 * step("h100-sxm", 8).step_time_s
