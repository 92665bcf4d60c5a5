"""The per-scan Dice estimate: the evidence summed from the probabilities, the calibrated estimate, its
calibration at export (``imunet-export calibrate``), and where it shows (``--stats``, the console,
``--table``, ``--flag-below``, the Python API)."""

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from imunet.runtime.app.cli import app
from imunet.runtime.app.quality import estimate, largest_share
from imunet.runtime.contract.bundle import load_bundle
from imunet.runtime.contract.quality_model import LabelVolumes, QualityModel
from imunet.runtime.kernels.quality import label_evidence

runner = CliRunner()
NAMES = {0: "background", 1: "organ", 2: "lesion"}


def run(*args, command=app):
    res = runner.invoke(command, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def two_class_maps(shape=(6, 8, 8)):
    """Probabilities of background, organ and lesion; the organ a 2x4x4 block at p 0.8, a faint 0.01
    haze elsewhere; no lesion."""
    organ = np.full(shape, 0.01, np.float32)
    organ[2:4, 2:6, 2:6] = 0.8
    lesion = np.full(shape, 0.001, np.float32)
    return np.stack([1 - organ - lesion, organ, lesion])


def test_the_evidence_is_the_soft_dice_of_the_probabilities_against_the_labels():
    probs = two_class_maps()
    labels = probs.argmax(0).astype(np.uint8)
    crop = tuple(slice(0, s) for s in labels.shape)
    ev = label_evidence(probs, None, crop, labels)
    organ = probs[1]
    assert ev.voxels[1] == 32 and ev.tp[1] == pytest.approx(32 * 0.8, rel=1e-6)
    assert ev.mass[1] == pytest.approx(float(organ.sum()), rel=1e-6)
    assert ev.soft_dice()[1] == pytest.approx(2 * 25.6 / (32 + organ.sum()), rel=1e-6)
    assert ev.soft_dice(near=True)[1] == pytest.approx(2 * 25.6 / (32 + 25.6), rel=1e-6)  # the haze left out
    # blended windows: sums divided by their weights give the same evidence
    weights = np.full(labels.shape, 2.5, np.float32)
    again = label_evidence(probs * weights, weights, crop, labels)
    assert np.allclose(again.soft_dice(), ev.soft_dice(), atol=1e-6)


def test_an_uncalibrated_estimate_is_the_soft_dice_and_an_empty_label_is_not_scored_one():
    probs = two_class_maps()
    labels = probs.argmax(0).astype(np.uint8)
    ev = label_evidence(probs, None, tuple(slice(0, s) for s in labels.shape), labels)
    q = estimate(ev, labels, 0.001, NAMES, None)
    assert not q.calibrated and q.dice_estimate["organ"] == pytest.approx(ev.soft_dice()[1])
    assert q.empty == {"lesion": pytest.approx(0.0)} and q.dice_estimate["lesion"] == pytest.approx(1.0)  # no mass
    haze = probs.copy()
    haze[2] = 0.3  # the model expects lesion voxels, yet none won the argmax
    ev2 = label_evidence(haze, None, tuple(slice(0, s) for s in labels.shape), labels)
    assert estimate(ev2, labels, 0.001, NAMES, None).dice_estimate["lesion"] < 1e-6
    # with training volumes: the rate at which training cases lacked the label
    volumes = {"lesion": LabelVolumes(cases=18, absent=0, log_mean=0.0, log_std=1.0)}
    q3 = estimate(ev, labels, 0.001, NAMES, QualityModel(label_volumes=volumes))
    assert q3.dice_estimate["lesion"] == pytest.approx(1 / 20)
    assert q3.lowest == ("lesion", pytest.approx(0.05))


def test_a_calibrated_estimate_is_linear_and_clipped_and_sees_fragments_and_odd_volumes():
    probs = two_class_maps()
    labels = probs.argmax(0).astype(np.uint8)
    labels[0, 0, 0] = 1  # a stray island of organ
    ev = label_evidence(probs, None, tuple(slice(0, s) for s in labels.shape), labels)
    volumes = {"organ": LabelVolumes(cases=10, absent=0, log_mean=float(np.log(33 * 0.001)) + 1.0, log_std=0.5)}
    model = QualityModel(volumes, ("soft_dice", "fragmented", "volume_z"), (1.0, -2.0, -0.1), 0.05, {"organ": 0.01})
    q = estimate(ev, labels, 0.001, NAMES, model)
    f = q.features["organ"]
    assert f["fragmented"] == pytest.approx(1 / 33) and f["volume_z"] == pytest.approx(2.0)
    assert q.calibrated
    assert q.dice_estimate["organ"] == pytest.approx(0.06 + f["soft_dice"] - 2 / 33 - 0.2)
    clipped = QualityModel(volumes, ("soft_dice",), (5.0,), 0.0)
    assert estimate(ev, labels, 0.001, NAMES, clipped).dice_estimate["organ"] == 1.0
    assert largest_share(np.zeros((3, 3, 3), np.uint8), 1) == 1.0


@pytest.mark.parametrize("seed", [1, 10])
def test_the_fit_keeps_the_smaller_calibration_when_more_features_only_fit_noise(seed):
    """Dice follows the soft Dice alone; the other features are noise that, on these seeds, lowers
    the leave-one-scan-out error of larger candidates by less than its standard error."""
    from imunet.export.calibration import Observation, fit

    rng = np.random.default_rng(seed)
    obs = []
    for i in range(30):
        for label in ("organ", "lesion"):
            sd = rng.uniform(0.7, 0.95)
            truth = 0.8 * sd + 0.1 + rng.normal(0, 0.02)
            feats = {"soft_dice": sd, "soft_dice_near": sd + rng.normal(0, 0.01), "volume_z": rng.uniform(0, 2),
                     "fragmented": rng.uniform(0, 0.3), "volume_ml": 1.0}  # fmt: skip
            obs.append(Observation(f"c{i}", label, truth, feats))
    volumes = {n: LabelVolumes(30, 0, 0.0, 1.0) for n in ("organ", "lesion")}
    model = fit(obs, volumes, "synthetic", ["organ", "lesion"])
    assert model.features == ("soft_dice",) and not model.label_bias
    assert model.weights[0] == pytest.approx(0.8, abs=0.1)
    assert "standard error" in model.calibration["chosen_by"]


def test_the_fit_finds_what_predicts_dice_and_checks_itself_leave_one_scan_out():
    from imunet.export.calibration import Observation, fit, spearman

    rng = np.random.default_rng(0)
    obs = []
    for i in range(30):
        for label in ("organ", "lesion"):
            sd = rng.uniform(0.6, 1.0)
            frag = rng.uniform(0, 0.3)
            truth = 0.8 * sd - 0.5 * frag + (0.05 if label == "organ" else -0.05) + rng.normal(0, 0.005)
            feats = {"soft_dice": sd, "soft_dice_near": rng.uniform(0.6, 1.0), "volume_z": rng.uniform(0, 2),
                     "fragmented": frag, "volume_ml": 1.0}  # fmt: skip
            obs.append(Observation(f"c{i}", label, truth, feats))
    volumes = {n: LabelVolumes(30, 0, 0.0, 1.0) for n in ("organ", "lesion")}
    model = fit(obs, volumes, "synthetic", ["organ", "lesion"])
    assert set(model.features) >= {"soft_dice", "fragmented"}
    w = dict(zip(model.features, model.weights))
    assert w["soft_dice"] == pytest.approx(0.8, abs=0.03) and w["fragmented"] == pytest.approx(-0.5, abs=0.03)
    check = model.calibration["leave_one_scan_out"]
    assert check["scans"] == 30 and check["mae"] < 0.01 and check["spearman"] > 0.95
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 35.0])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([4, 3, 2, 1.0])) == pytest.approx(-1.0)


def test_training_volumes_read_label_maps_stored_as_floats(tmp_path):
    from imunet.export.calibration import training_volumes

    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    for i, n in enumerate((8, 27)):
        label = np.zeros((10, 10, 10), np.float32)  # the hippocampus dataset stores its labels as float32
        label[:2, :2, :2] = 1.0
        label[5:, 5:, 5:][: n // 9 + 1, :3, :3] = 2.0
        for sub, name in (("labelsTr", f"c{i}.nii.gz"), ("imagesTr", f"c{i}_0000.nii.gz")):
            sitk.WriteImage(sitk.GetImageFromArray(label), str(tmp_path / sub / name))
    volumes = training_volumes(tmp_path, ["c0", "c1"], NAMES)
    assert volumes["organ"].cases == 2 and volumes["organ"].absent == 0
    assert volumes["organ"].log_mean == pytest.approx(np.log(0.008)) and volumes["organ"].log_std == 0.0
    assert volumes["lesion"].log_mean == pytest.approx(np.log(np.sqrt(0.009 * 0.036)))  # 9 and 36 voxels


def held_out_dataset(phantom_dir, tmp_path):
    """The phantoms the tiny bundle trained on, and six more it never saw (``held_*``)."""
    from make_phantoms import write_dataset

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    extra = write_dataset(tmp_path / "extra", cases=6, shape=(24, 40, 40), seed=7)
    for sub in ("imagesTr", "labelsTr"):
        for p in (extra / sub).iterdir():
            shutil.copy(p, data / sub / p.name.replace("phantom_", "held_"))
    return data


def test_a_bundle_is_calibrated_on_cases_it_did_not_train_on_and_the_original_is_kept(
    bundle_dir, phantom_dir, tmp_path
):
    from imunet.export.cli import calibrate_app

    data = held_out_dataset(phantom_dir, tmp_path)
    before = (bundle_dir / "manifest.json").read_bytes()
    out = tmp_path / "calibrated.imunet"
    held = ",".join(f"held_{i:03d}" for i in range(6))
    code, stdout, err = run(bundle_dir, "--out", out, "--dataset", data, "--cases", held, command=calibrate_app)
    assert code == 0, err
    assert "leave-one-scan-out over 6 scans" in stdout and (bundle_dir / "manifest.json").read_bytes() == before
    q = load_bundle(out).manifest.quality  # loads: every file hash checked
    assert q is not None and q.calibrated and q.calibration["cases"] == 6
    assert set(q.label_volumes) == {"organ", "lesion"} and q.label_volumes["organ"].cases == 4  # its training cases
    # cases it trained on are refused: they would make the estimate trust the model too much
    trained = ",".join(load_bundle(bundle_dir).manifest.provenance.training_cases)
    code, _, err = run(bundle_dir, "--out", tmp_path / "x.imunet", "--dataset", data, "--cases", trained,
                       command=calibrate_app)  # fmt: skip
    assert code == 2 and "trained the bundle" in err and not (tmp_path / "x.imunet").exists()
    # a bundle that trained on every case borrows its split twin's calibration, keeping its own volumes
    code, _, err = run(bundle_dir, "--out", tmp_path / "b.imunet", "--dataset", data, "--from", out,
                       command=calibrate_app)  # fmt: skip
    assert code == 0, err
    b = load_bundle(tmp_path / "b.imunet").manifest.quality
    assert b.weights == q.weights and b.calibration["note"].startswith("borrowed from calibrated.imunet")
    code, _, err = run(bundle_dir, "--out", tmp_path / "c.imunet", "--dataset", data, "--from", bundle_dir,
                       command=calibrate_app)  # fmt: skip
    assert code == 2 and "no calibrated Dice estimate to borrow" in err


def test_the_estimate_shows_in_stats_console_table_and_flags_scans_for_review(bundle_dir, phantom_dir, tmp_path):
    scans = tmp_path / "in"
    scans.mkdir()
    for i in (0, 1):
        shutil.copy(phantom_dir / "imagesTr" / f"phantom_00{i}_0000.nii.gz", scans)
    stats, table = tmp_path / "s.json", tmp_path / "t.csv"
    code, stdout, err = run(scans, "-m", bundle_dir, "--out", tmp_path / "o", "--stats", stats, "--table", table,
                            "--flag-below", "1.0")  # fmt: skip
    assert code == 0, err  # flagged, not failed
    assert stdout.count("lowest Dice estimate") == 2 and "uncalibrated" in stdout
    assert err.count("review: Dice estimate under 1") == 2
    entries = json.loads(stats.read_text())["scans"]
    for e in entries:
        est = e["quality"]["dice_estimate"]
        assert set(est) == {"organ", "lesion"} and all(0.0 <= v <= 1.0 for v in est.values())
        assert e["flagged"]["below"] == 1.0 and min(est.values()) == min(e["flagged"]["labels"].values())
    rows = list(csv.DictReader(table.open()))
    assert [r["flagged"] for r in rows] == ["yes", "yes"]
    assert float(rows[0]["dice_estimate_lowest"]) == min(entries[0]["quality"]["dice_estimate"].values())
    assert rows[0]["organ_dice_estimate"] != ""
    code, _, err = run(scans, "-m", bundle_dir, "--out", tmp_path / "o2", "--flag-below", "0")
    assert code == 0 and "review" not in err
    code, _, err = run(scans, "-m", bundle_dir, "--out", tmp_path / "o3", "--flag-below", "1.5")
    assert code == 2 and "between 0 and 1" in err and not (tmp_path / "o3").exists()


def test_the_python_api_returns_the_estimate_with_the_labels(bundle_dir, phantom_dir):
    from imunet.runtime import Segmenter

    image = sitk.ReadImage(str(phantom_dir / "imagesTr" / "phantom_000_0000.nii.gz"))
    with Segmenter(bundle_dir) as seg:
        result = seg.segment(image)
        with_probs = seg.segment(image, probabilities=True)
    q = result.quality
    assert q is not None and set(q.dice_estimate) == {"organ", "lesion"}
    assert result.stats["quality"]["dice_estimate"] == {k: round(v, 3) for k, v in q.dice_estimate.items()}
    # the same scan through the probabilities path: the same labels, the same estimate
    assert with_probs.quality.dice_estimate == pytest.approx(q.dice_estimate, abs=1e-4)
