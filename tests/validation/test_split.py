"""The calibration/evaluation split: a case used for fitting is never scored as held-out."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import write_folder  # noqa: E402

from plansim.validation.calibrate import calibrate
from plansim.validation.compare import (CALIBRATED_DIR, DATA_DIR, SplitError, data_folders, device_for_folder,
                                        XLA_PREFIX, load_suite, validate)
from plansim.validation.runner.common import split_for

STORED = data_folders(DATA_DIR)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_folder(root, "h100-x1", "h100-sxm", 1)
    write_folder(root, "h200-x2", "h200", 2, seed=1)
    profiles = root / "calibrated"
    calibrate(root, out_dir=profiles)
    return root, profiles


def _recorded(profiles: Path, vidur: bool = False) -> dict:
    """(folder, suite) -> fitted case ids over the stored profiles: our measurement folders, or
    with ``vidur`` only Vidur's tables (``plansim calibrate --from-vidur``)."""
    out = {}
    for path in sorted(Path(profiles).glob("*.yaml")):
        for folder, suites in (yaml.safe_load(path.read_text()).get("case_ids") or {}).items():
            if (folder == "vidur") != vidur:
                continue
            for suite, ids in suites.items():
                out.setdefault((folder, suite), set()).update(ids)
    return out


def test_calibration_uses_only_the_calibration_split(synthetic):
    root, profiles = synthetic
    recorded = _recorded(profiles)
    assert recorded, "calibrate records the case ids it fitted on"
    for (folder, suite), ids in recorded.items():
        frame = load_suite(root / folder, suite)
        split = dict(zip(frame["case_id"], frame["split"]))
        assert {split[i] for i in ids} == {"calibration"}


def test_scored_cases_are_disjoint_from_fitted_ones(synthetic):
    root, profiles = synthetic
    scored = validate("all", root, profiles_dir=profiles)
    recorded = _recorded(profiles)
    assert len(scored)
    for (folder, suite), ids in recorded.items():
        held_out = set(scored.loc[(scored.source == folder) & (scored.suite == suite), "case_id"])
        assert held_out and not held_out & ids
    # every scored case is of the evaluation split
    for folder in ("h100-x1", "h200-x2"):
        for suite in ("kernels", "transfers", "collectives"):
            frame = load_suite(root / folder, suite)
            if frame.empty:
                continue
            split = dict(zip(frame["case_id"], frame["split"]))
            mine = scored[(scored.source == folder) & (scored.suite == suite)]
            assert {split[c] for c in mine.case_id} <= {"evaluation"}


def test_a_fitted_case_scored_as_held_out_fails(synthetic, tmp_path):
    root, profiles = synthetic
    bad = tmp_path / "calibrated"
    bad.mkdir()
    for path in profiles.glob("*.yaml"):
        (bad / path.name).write_text(path.read_text())
    path = bad / "h100-sxm.yaml"
    profile = yaml.safe_load(path.read_text())
    frame = load_suite(root / "h100-x1", "kernels", "evaluation")
    profile["case_ids"]["h100-x1"]["kernels"].append(frame["case_id"].iloc[0])  # pretend it was fitted on
    path.write_text(yaml.safe_dump(profile))
    with pytest.raises(SplitError, match="used for calibration"):
        validate("kernels", root, profiles_dir=bad)


RUNNER_FOLDERS = [f for f in STORED if not f.name.startswith(XLA_PREFIX)]  # xla-*: tests/validation/test_xla.py


@pytest.mark.skipif(not RUNNER_FOLDERS, reason="no stored measurements under validation/data yet")
@pytest.mark.parametrize("folder", RUNNER_FOLDERS, ids=[f.name for f in RUNNER_FOLDERS])
def test_stored_split_column_is_the_documented_hash(folder):
    for suite in ("kernels", "transfers", "collectives", "steps"):
        path = folder / f"{suite}.csv"
        if not path.is_file():
            continue
        import pandas as pd
        frame = pd.read_csv(path, keep_default_na=False)
        assert set(frame["split"]) <= {"calibration", "evaluation"}
        assert list(frame["split"]) == [split_for(suite, c) for c in frame["case_id"]]
        if suite == "steps":
            assert set(frame["split"]) == {"evaluation"}


@pytest.mark.skipif(not STORED, reason="no stored measurements under validation/data yet")
def test_stored_profiles_were_fitted_on_calibration_rows_only():
    recorded = _recorded(CALIBRATED_DIR)
    assert recorded, "commit hardware_profiles/calibrated/*.yaml written by plansim calibrate"
    for (folder, suite), ids in recorded.items():
        frame = load_suite(DATA_DIR / folder, suite)
        split = dict(zip(frame["case_id"], frame["split"]))
        assert ids <= set(split), f"{folder}/{suite}: fitted on cases missing from the data"
        assert {split[i] for i in ids} == {"calibration"}
    scored = validate("all", DATA_DIR)
    for (folder, suite), ids in recorded.items():
        assert not set(scored.loc[(scored.source == folder) & (scored.suite == suite), "case_id"]) & ids
    assert {device_for_folder(f) for f in STORED} <= {p.stem for p in CALIBRATED_DIR.glob("*.yaml")}


@pytest.mark.skipif(not (DATA_DIR / "vidur").is_dir(), reason="no Vidur tables under validation/data")
def test_vidur_transfer_fit_uses_calibration_rows_and_is_never_scored(tmp_path):
    from plansim.validation.vidur import FIT_MIN_TOKENS, calibrate_from_vidur

    ids = _recorded(CALIBRATED_DIR, vidur=True).get(("vidur", "vidur"), set())
    assert ids, "commit hardware_profiles/calibrated/a100-80gb.yaml written by plansim calibrate --from-vidur"
    assert {split_for("vidur", i) for i in ids} == {"calibration"}
    assert all(int(i.split(":T")[1].split(":")[0]) >= FIT_MIN_TOKENS for i in ids)
    scored = validate("vidur", DATA_DIR)
    a100 = scored[scored.source == "vidur-a100"]
    assert len(a100) > 0 and not set(a100.case_id) & ids
    # the stored profile is what the fit gives today (reproducible from the committed data)
    stored = yaml.safe_load((CALIBRATED_DIR / "a100-80gb.yaml").read_text())
    refit = yaml.safe_load(calibrate_from_vidur(DATA_DIR / "vidur", CALIBRATED_DIR, tmp_path).read_text())
    assert refit["parameters"] == pytest.approx(stored["parameters"], rel=1e-3)
    assert set(refit["case_ids"]["vidur"]["vidur"]) == ids
