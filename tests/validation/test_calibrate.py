"""Calibration: bounded physical fits that recover known parameters; predictions move only
through profile parameters (the same cost-model code serves datasheet and calibrated profiles)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import TRUE_DEVICE, TRUE_NVLINK, TRUE_PCIE, write_folder  # noqa: E402

from plansim.simulator.calibration import calibrate_cluster, read_calibration
from plansim.simulator.costs import compute
from plansim.simulator.costs.collectives import Group, collective_time
from plansim.simulator.hardware import build_cluster, load_device
from plansim.validation.calibrate import calibrate
from plansim.validation.compare import (CALIBRATED_DIR, DATA_DIR, base_cluster, data_folders, load_suite,
                                        predict_collective, predict_kernel, predict_transfer)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_folder(root, "h200-x2", "h200", 2, seed=3, noise=0.01)
    out = root / "calibrated"
    written = calibrate(root, out_dir=out)
    return root, written["h200"]


def test_recovers_the_parameters_that_generated_the_data(fitted):
    _, path = fitted
    profile = yaml.safe_load(path.read_text())
    p = profile["parameters"]
    assert p["achievable_gemm_fraction"] == pytest.approx(TRUE_DEVICE["achievable_gemm_fraction"], rel=0.05)
    assert p["achievable_hbm_bw_Bps"] == pytest.approx(TRUE_DEVICE["achievable_hbm_bw_Bps"], rel=0.05)
    assert p["attention_fraction"] == pytest.approx(TRUE_DEVICE["attention_fraction"], rel=0.1)
    assert p["kernel_launch_s"] == pytest.approx(TRUE_DEVICE["kernel_launch_s"], rel=0.25)
    pcie = profile["links"]["pcie5-x16"]
    assert pcie["achievable_bw_Bps"] == pytest.approx(TRUE_PCIE["achievable_bw_Bps"], rel=0.05)
    assert pcie["pageable_fraction"] == pytest.approx(TRUE_PCIE["pageable_fraction"], rel=0.1)
    nvl = profile["links"]["nvlink4-nvswitch"]
    assert nvl["achievable_bw_Bps"] == pytest.approx(TRUE_NVLINK["achievable_bw_Bps"], rel=0.05)
    for op, eff in TRUE_NVLINK["op_efficiency"].items():
        assert nvl["op_efficiency"][op] == pytest.approx(eff, rel=0.05)
    assert p["collective_launch_s"] == pytest.approx(TRUE_DEVICE["collective_launch_s"], rel=0.1)
    assert profile["fitted_on"] and all("split=calibration" in f for f in profile["fitted_on"])


def test_fitted_values_stay_physical(fitted):
    _, path = fitted
    profile = yaml.safe_load(path.read_text())
    dev = load_device("h200")
    p = profile["parameters"]
    assert 0 < p["achievable_gemm_fraction"] <= 1 and 0 < p["attention_fraction"] <= 1
    assert p["achievable_hbm_bw_Bps"] <= dev.hbm_bw_Bps
    cluster = build_cluster("h200", nodes=1, gpus_per_node=2)
    assert profile["links"]["pcie5-x16"]["achievable_bw_Bps"] <= cluster.host_link.bw_Bps
    assert profile["links"]["nvlink4-nvswitch"]["achievable_bw_Bps"] <= cluster.intra_node_link.bw_Bps
    # the profile loads through the simulator's own validation (pydantic bounds, sources)
    read_calibration.cache_clear()
    machine, source = calibrate_cluster(cluster, path)
    assert source and machine.device.achievable_gemm_fraction == p["achievable_gemm_fraction"]


def _profiles():
    out = [("synthetic", None)]
    out += [(p.stem, p) for p in sorted(CALIBRATED_DIR.glob("*.yaml"))]
    return out


def test_calibration_moves_predictions_only_through_parameters(fitted):
    """calibrated prediction == the same function on the datasheet profile with the fitted
    parameter values copied in; and with no parameters changed nothing moves."""
    root, path = fitted
    folders = [root / "h200-x2"] + data_folders(DATA_DIR)
    for folder in folders:
        cluster = base_cluster(folder)
        profile_path = path if folder.parent == root else CALIBRATED_DIR / f"{cluster.device.name}.yaml"
        if not profile_path.is_file():
            continue
        read_calibration.cache_clear()
        calibrated, _ = calibrate_cluster(cluster, profile_path)
        profile = read_calibration(profile_path)
        params = profile.get("parameters") or {}
        links = profile.get("links") or {}
        by_hand = cluster.model_copy(update={
            "device": cluster.device.model_copy(update=params),
            "host_link": cluster.host_link.model_copy(update=links.get(cluster.host_link.name, {})),
            "intra_node_link": cluster.intra_node_link.model_copy(
                update=links.get(cluster.intra_node_link.name, {}))})
        for r in load_suite(folder, "kernels").head(60).to_dict("records"):
            if r["kind"] in ("gemm", "attention", "memcpy", "elementwise", "rmsnorm", "layernorm"):
                assert predict_kernel(r, calibrated.device) == pytest.approx(predict_kernel(r, by_hand.device),
                                                                              rel=1e-12)
                assert predict_kernel(r, cluster.device) == predict_kernel(
                    r, cluster.device.model_copy(update={}))
        for r in load_suite(folder, "transfers").to_dict("records"):
            if r["kind"] in ("h2d", "d2h"):
                assert predict_transfer(r, calibrated) == pytest.approx(predict_transfer(r, by_hand), rel=1e-12)
        for r in load_suite(folder, "collectives").to_dict("records"):
            if int(r["group_size"]) > 1:
                assert predict_collective(r, calibrated) == pytest.approx(predict_collective(r, by_hand),
                                                                          rel=1e-12)


def test_public_api_applies_the_stored_profile():
    """plansim.predict_op with calibration equals the cost function on the datasheet device
    updated with the stored parameters (the same model code)."""
    from plansim.api import predict_op
    for path in sorted(CALIBRATED_DIR.glob("*.yaml")):
        params = yaml.safe_load(path.read_text()).get("parameters") or {}
        dev = load_device(path.stem)
        got = predict_op("gemm", path.stem, m=4096, n=4096, k=4096, dtype="bf16")
        assert got["calibrated_profile"]
        want = float(compute.gemm_time(4096, 4096, 4096, "bf16", dev.model_copy(update=params)))
        assert got["time_s"] == pytest.approx(want, rel=1e-12)
        raw = predict_op("gemm", path.stem, calibrated=False, m=4096, n=4096, k=4096)
        assert raw["time_s"] == pytest.approx(float(compute.gemm_time(4096, 4096, 4096, "bf16", dev)), rel=1e-12)


def test_collective_time_depends_on_link_calibration_only_via_fields(fitted):
    _, path = fitted
    cluster = build_cluster("h200", nodes=1, gpus_per_node=2)
    read_calibration.cache_clear()
    calibrated, _ = calibrate_cluster(cluster, path)
    nvl = yaml.safe_load(path.read_text())["links"]["nvlink4-nvswitch"]
    # the same cost function on the datasheet cluster with only the fitted link fields copied in
    by_hand = cluster.model_copy(update={"intra_node_link": cluster.intra_node_link.model_copy(update=nvl),
                                         "device": calibrated.device})
    for nbytes in np.logspace(10, 30, 6, base=2):
        t = collective_time("all_reduce", nbytes, Group(2, 2), calibrated)
        expected = collective_time("all_reduce", nbytes, Group(2, 2), by_hand)
        assert t == pytest.approx(expected, rel=1e-9)
