"""What a new user and a nightly job meet: names, permissions, reruns, quiet runs, extra outputs,
the API, help and versions."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from imunet.runtime.app.cli import app

from conftest import ROOT

runner = CliRunner()


def run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture()
def scans(phantom_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in (0, 1):
        shutil.copy(phantom_dir / "imagesTr" / f"phantom_00{i}_0000.nii.gz", folder)
    shutil.copy(phantom_dir / "imagesTr" / "phantom_002_0000.nii.gz", folder / "plain.nii.gz")
    return folder


def test_output_names_follow_nnunet(bundle_dir, scans, tmp_path):
    code, out, _ = run(scans, "--model", bundle_dir, "--out", tmp_path / "a" / "b")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["phantom_000.nii.gz", "phantom_001.nii.gz",
                                                                      "plain_seg.nii.gz"]  # fmt: skip
    assert f"creating the output folder {tmp_path / 'a' / 'b'}" in out


def test_outputs_follow_the_umask(bundle_dir, scans, tmp_path):
    old = os.umask(0o022)
    try:
        scan = scans / "phantom_000_0000.nii.gz"
        code, _, err = run(scan, "--model", bundle_dir, "--out", tmp_path / "s.nii.gz", "--preview", tmp_path / "p.png",
                           "--stats", tmp_path / "st.json", "--masks")  # fmt: skip
        assert code == 0, err
        for name in ("s.nii.gz", "p.png", "st.json", "s_organ.nii.gz", "s_lesion.nii.gz"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    finally:
        os.umask(old)


def test_stats_and_preview_are_never_replaced_without_overwrite(bundle_dir, scans, tmp_path):
    scan, dest = scans / "phantom_000_0000.nii.gz", tmp_path / "x.nii.gz"
    kept = tmp_path / "kept.json"
    kept.write_text("precious")
    code, _, err = run(scan, "--model", bundle_dir, "--out", dest, "--stats", kept)
    assert code == 2 and f"--stats {kept}: exists and cannot be read as imunet-run statistics" in err
    assert kept.read_text() == "precious" and not dest.exists()
    picture = tmp_path / "kept.png"
    picture.write_text("precious")
    code, _, err = run(scan, "--model", bundle_dir, "--out", dest, "--preview", picture)
    assert code == 1 and f"{picture}: exists; pass --overwrite" in err
    assert picture.read_text() == "precious" and not dest.exists()  # a scan's outputs come all or none


def test_nightly_reruns_skip_what_exists(bundle_dir, scans, tmp_path):
    out = tmp_path / "out"
    code, _, _ = run(scans, "--model", bundle_dir, "--out", out)
    assert code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run(scans, "--model", bundle_dir, "--out", out)
    assert code == 1 and err.count("exists; pass --overwrite") == 3
    code, stdout, _ = run(scans, scans / "plain.nii.gz", "--model", bundle_dir, "--out", out, "--skip-existing")
    assert code == 0 and "0 of 3 scans segmented, 3 skipped (outputs exist)" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    code, _, err = run(scans, "--model", bundle_dir, "--out", out, "--skip-existing", "--overwrite")
    assert code == 2 and "contradict" in err


def test_a_scan_given_twice_is_segmented_once(bundle_dir, scans, tmp_path):
    scan = scans / "plain.nii.gz"
    code, stdout, err = run(scan, scan, "--model", bundle_dir, "--out", tmp_path / "o")
    assert code == 0 and f"note: {scan} was given more than once; it is segmented once" in err
    assert "1 of 1 scans segmented" in stdout


def test_quiet_prints_only_the_summary(bundle_dir, scans, tmp_path):
    code, stdout, err = run(scans, "--model", bundle_dir, "--out", tmp_path / "o", "-q")
    assert code == 0 and stdout.strip() == "3 of 3 scans segmented" and err == ""


def test_roi_masks_and_probabilities(bundle_dir, scans, tmp_path):
    scan = scans / "phantom_001_0000.nii.gz"
    code, _, err = run(scan, "--model", bundle_dir, "--out", tmp_path / "all.nii.gz", "--masks", "--save-probabilities")
    assert code == 0, err
    full = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "all.nii.gz")))
    for k, name in ((1, "organ"), (2, "lesion")):
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"all_{name}.nii.gz"))), full == k
        )
    probs = np.load(tmp_path / "all_probabilities.npz")
    assert probs["probabilities"].dtype == np.float16 and probs["probabilities"].shape == (3, *full.shape)
    assert list(probs["labels"]) == ["background", "organ", "lesion"]
    assert (probs["probabilities"].astype(np.float32).argmax(0) == full).mean() > 0.999
    code, _, _ = run(scan, "--model", bundle_dir, "--out", tmp_path / "roi.nii.gz", "--roi", "lesion")
    roi = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "roi.nii.gz")))
    assert code == 0 and set(np.unique(roi)) <= {0, 2} and ((roi == 2) == (full == 2)).all()
    code, _, err = run(scan, "--model", bundle_dir, "--out", tmp_path / "bad.nii.gz", "--roi", "liver")
    assert code == 2 and "--roi liver: the model has no such label; it has organ (1), lesion (2)" in err


def test_the_api_takes_a_path_and_reports_timings(bundle_dir, scans):
    from imunet.runtime import ImunetError, Segmenter

    seg = Segmenter(bundle_dir, backend="ort-cpu")
    labels = seg.predict(str(scans / "plain.nii.gz"))
    assert labels.GetSize() == sitk.ReadImage(str(scans / "plain.nii.gz")).GetSize()
    assert {"read_s", "preprocess_s", "inference_s", "resample_back_s", "total_s", "volumes_ml"} <= set(seg.last_stats)
    with pytest.raises(ImunetError, match="no such file or directory"):
        seg.predict(scans / "nope.nii.gz")


def test_the_readme_python_blocks_run_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    shutil.copy(ROOT / "runtime" / "default" / "sample" / "hippocampus_014_0000.nii.gz", tmp_path / "scan.nii.gz")
    for code in blocks:
        res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("command", ["imunet-run", "imunet-export", "imunet-train", "imunet-evaluate", "imunet-serve"])
def test_every_command_has_a_version_and_plain_flags(command):
    module = {"imunet-run": "imunet.runtime.app.cli", "imunet-export": "imunet.export.cli",
              "imunet-train": "imunet.cli", "imunet-evaluate": "imunet.runtime.app.evaluate_cli",
              "imunet-serve": "imunet.runtime.app.serve_cli"}[command]  # fmt: skip
    res = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and re.fullmatch(rf"{command} \d+\.\d+\.\d+\n", res.stdout)
    helptext = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert "<bool>" not in helptext.stdout


def test_run_help_says_where_defaults_come_from():
    text = runner.invoke(app, ["--help"], terminal_width=200).stdout
    for option in ("--mode", "--overlap", "--stride"):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(option))
        assert "Default: the bundle's." in line, line


def test_imunet_evaluate_scores_a_prediction_folder(bundle_dir, phantom_dir, tmp_path):
    from imunet.runtime.app.evaluate_cli import app as evaluate_app

    cases = ["phantom_000", "phantom_001"]
    for c in cases:
        shutil.copy(phantom_dir / "imagesTr" / f"{c}_0000.nii.gz", tmp_path)
    code, _, err = run(*[tmp_path / f"{c}_0000.nii.gz" for c in cases], "--model", bundle_dir, "--out", tmp_path / "p")
    assert code == 0, err
    args = ["-r", phantom_dir / "labelsTr", "-p", tmp_path / "p", "--model", bundle_dir]
    res = runner.invoke(
        evaluate_app, [str(a) for a in [*args, "--csv", tmp_path / "s.csv", "--json", tmp_path / "s.json"]]
    )
    assert res.exit_code == 0, res.stderr
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0] == "case,label,name,dice,hd95_mm,reference_ml,prediction_ml" and len(rows) == 1 + 2 * 2
    scores = json.loads((tmp_path / "s.json").read_text())
    from imunet.runtime.imaging.metrics import dice

    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p" / "phantom_000.nii.gz")))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom_dir / "labelsTr" / "phantom_000.nii.gz")))
    first = next(s for s in scores["scores"] if s["case"] == "phantom_000" and s["label"] == 1)
    assert first["name"] == "organ" and np.isclose(first["dice"], dice(pred, ref, 1))
    (tmp_path / "empty").mkdir()
    res = runner.invoke(evaluate_app, ["-r", str(tmp_path / "p"), "-p", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "pairs with a reference" in res.stderr
