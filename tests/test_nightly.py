"""A job that runs the same imunet-run line every night, and the files its users see: statistics that
accumulate, outputs committed together, previews where the run says, empty drop folders, --roi
volumes, trusted-key folders, untrained models and the evaluation's warnings."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from imunet.runtime.app.cli import app
from imunet.runtime.app.evaluate_cli import app as evaluate_app

from conftest import ROOT

runner = CliRunner()
SAMPLE = ROOT / "runtime" / "default" / "sample"


def run(*args, command=app):
    res = runner.invoke(command, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture()
def drop(phantom_dir, tmp_path):
    """A drop folder with two scans, and a third that arrives on night 2."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in (0, 1):
        shutil.copy(phantom_dir / "imagesTr" / f"phantom_00{i}_0000.nii.gz", folder)
    return folder


def snapshot(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_the_same_command_works_every_night_and_keeps_every_nights_statistics(bundle_dir, phantom_dir, drop, tmp_path):
    out, stats = tmp_path / "out", tmp_path / "run.json"
    line = [drop, "--model", bundle_dir, "--out", out, "--skip-existing", "--stats", stats]
    code, stdout, err = run(*line)
    assert code == 0, err
    night1 = json.loads(stats.read_text())
    before = snapshot(out)
    shutil.copy(phantom_dir / "imagesTr" / "phantom_002_0000.nii.gz", drop)  # a new scan arrives
    code, stdout, err = run(*line)
    assert code == 0, err
    assert "1 of 3 scans segmented, 2 skipped (outputs exist)" in stdout
    assert {k: v for k, v in snapshot(out).items() if k in before} == before  # untouched
    ledger = json.loads(stats.read_text())
    assert [r["segmented"] for r in ledger["runs"]] == [2, 1] and [r["skipped"] for r in ledger["runs"]] == [0, 2]
    by_input = {s["input"]: s for s in ledger["scans"]}
    assert len(by_input) == 3
    for entry in night1["scans"]:  # night 1's figures are kept, not replaced by "skipped"
        assert by_input[entry["input"]] == {**entry, "run": 0}
    assert by_input[str(drop / "phantom_002_0000.nii.gz")]["run"] == 1


def test_statistics_are_never_written_over_a_file_that_is_not_imunets(bundle_dir, drop, tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"my": "notes"}))
    code, _, err = run(drop, "--model", bundle_dir, "--out", tmp_path / "o", "--stats", notes)
    assert code == 2 and "is not an imunet-run statistics file" in err
    assert json.loads(notes.read_text()) == {"my": "notes"} and not (tmp_path / "o").exists()


def test_an_output_that_cannot_be_written_is_refused_before_work(bundle_dir, drop, tmp_path):
    for preview, message in (("prev.jpg", "previews are PNG"), ("p.png", "names one file but 2 scans were given")):
        code, _, err = run(drop, "--model", bundle_dir, "--out", tmp_path / "o", "--preview", tmp_path / preview)
        assert code == 2 and message in err and err.count("\n") == 1, err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(drop, "--model", bundle_dir, "--out", blocker / "o")
    assert code == 2 and f"--out {blocker / 'o'}: {blocker} exists and is not a folder" in err
    code, _, err = run(drop, "--model", bundle_dir, "--out", drop)
    assert code == 2 and "is an input folder; its outputs would be read as scans on the next run" in err
    assert not (tmp_path / "o").exists() and sorted(p.name for p in drop.iterdir()) == [
        "phantom_000_0000.nii.gz", "phantom_001_0000.nii.gz"]  # fmt: skip


def test_a_failed_output_leaves_none_of_the_scans_outputs(bundle_dir, drop, tmp_path, monkeypatch):
    """The label map is committed last and only when every output of the scan was written."""
    from imunet.runtime.app import preview

    def broken(*_args, **_kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(preview, "save_preview", broken)
    out = tmp_path / "o"
    code, _, err = run(drop, "--model", bundle_dir, "--out", out, "--preview", tmp_path / "prev", "--masks")
    assert code == 1 and err.count("FAILED") == 2 and "disk full" in err
    assert list(out.iterdir()) == [] if out.exists() else True
    assert not (tmp_path / "prev").exists() or list((tmp_path / "prev").iterdir()) == []


def test_previews_go_where_the_run_says_and_skip_existing_makes_only_what_is_missing(bundle_dir, drop, tmp_path):
    out, prev = tmp_path / "out", tmp_path / "previews"
    code, stdout, err = run(drop, "--model", bundle_dir, "--out", out)
    assert code == 0, err
    labels = snapshot(out)
    code, stdout, err = run(drop, "--model", bundle_dir, "--out", out, "--preview", prev, "--skip-existing")
    assert code == 0, err
    assert sorted(p.name for p in prev.iterdir()) == ["phantom_000.png", "phantom_001.png"]
    assert f"-> {prev / 'phantom_000.png'}" in stdout  # the line names what it wrote
    assert snapshot(out) == labels  # the label maps that existed are not rewritten
    code, stdout, _ = run(drop, "--model", bundle_dir, "--out", out, "--preview", prev, "--skip-existing")
    assert code == 0 and "0 of 2 scans segmented, 2 skipped (outputs exist)" in stdout


def test_an_empty_drop_folder_is_zero_scans_not_a_failure(bundle_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_text("")
    code, stdout, err = run(tmp_path / "empty", "--model", bundle_dir, "--out", tmp_path / "x")
    assert code == 0 and stdout.strip().startswith("0 scans") and "FAILED" not in err
    assert stdout.count("\n") == 1 and not (tmp_path / "x").exists()


def test_roi_reports_the_volumes_of_what_it_writes(tmp_path):
    scan = SAMPLE / "hippocampus_014_0000.nii.gz"
    code, stdout, err = run(scan, "--out", tmp_path / "p.nii.gz", "--roi", "posterior", "--stats", tmp_path / "s.json")
    assert code == 0, err
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.nii.gz")))
    assert set(np.unique(written)) == {0, 2}
    entry = json.loads((tmp_path / "s.json").read_text())["scans"][0]
    assert list(entry["volumes_ml"]) == ["posterior"]
    assert entry["volumes_ml"]["posterior"] == pytest.approx((written == 2).sum() / 1000.0, abs=1e-3)  # 1 mm voxels
    line = next(ln for ln in stdout.splitlines() if ln.startswith("[1/1]"))
    assert "(posterior " in line and "anterior" not in line
    code, _, err = run(scan, "--out", tmp_path / "b.nii.gz", "--roi", "anterior,posterior")
    assert code == 0, err


def test_a_private_key_in_the_trusted_keys_folder_is_named_and_never_loaded(tmp_path):
    from imunet.export.signing import keygen

    keys = tmp_path / "keys"
    keys.mkdir()
    keygen(keys / "site.pem")  # keygen writes the private key and its .pub.pem side by side
    code, _, err = run(SAMPLE / "hippocampus_014_0000.nii.gz", "--out", tmp_path / "o.nii.gz",
                       "--trusted-keys", keys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert f"{keys / 'site.pem'} is a private key; only public keys belong in this folder" in err
    assert "BEGIN PUBLIC KEY" not in err and not (tmp_path / "o.nii.gz").exists()


def test_an_empty_result_is_a_warning(bundle_dir, phantom_dir, tmp_path):
    """A model that learnt nothing (its decoder's background logit outweighs every other) writes an
    empty label map, and says so."""
    import onnx
    from onnx import numpy_helper

    from imunet.export.bundle import finalize_manifest
    from imunet.runtime.contract.bundle import load_bundle

    blank = tmp_path / "blank.imunet"
    shutil.copytree(bundle_dir, blank)
    for f in blank.glob("decoder_*.onnx"):
        f.unlink()  # only the fp32 decoder is edited
    graph = onnx.load(blank / "decoder.onnx")
    bias = next(t for t in graph.graph.initializer if t.name == "mlp.out.bias")
    values = numpy_helper.to_array(bias).copy()
    values[0] = 1e4
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(graph, blank / "decoder.onnx")
    manifest = load_bundle(bundle_dir, verify=False).manifest
    finalize_manifest(blank, replace(manifest, variants={k: v for k, v in manifest.variants.items()
                                                         if not v.file.startswith("decoder_")}))  # fmt: skip
    scan = phantom_dir / "imagesTr" / "phantom_000_0000.nii.gz"
    code, _, err = run(scan, "--model", blank, "--backend", "ort-cpu", "--out", tmp_path / "o.nii.gz")
    assert code == 0 and "nothing found for any label: the label map is empty" in err
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o.nii.gz"))).any()
    code, _, err = run(scan, "--model", bundle_dir, "--backend", "ort-cpu", "--out", tmp_path / "p.nii.gz")
    assert code == 0 and "nothing found" not in err  # the trained model finds its labels


def test_export_warns_about_a_model_that_learnt_nothing(trained_run, tmp_path, monkeypatch):
    from imunet.export import cli as export_cli

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["val_dice_by_name"] = dict.fromkeys(metrics["val_dice_by_name"], 0.0)
    metrics["val_dice_mean"] = 0.0
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    code, _, err = run(run_dir, "--out", tmp_path / "b.imunet", command=export_cli.app)
    assert code == 0 and "WARNING: the run's validation Dice is 0.000: the model has not learnt to segment" in err


def test_evaluate_names_labels_and_warns_on_training_cases_and_unpaired_files(tmp_path):
    refs, preds = tmp_path / "data" / "labelsTr", tmp_path / "preds"
    refs.mkdir(parents=True)
    shutil.copy(SAMPLE / "hippocampus_014.nii.gz", refs)
    shutil.copy(SAMPLE / "hippocampus_014.nii.gz", refs / "hippocampus_777.nii.gz")  # no prediction for it
    labels = {"background": 0, "anterior": 1, "posterior": 2}
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({"labels": labels}))
    code, _, err = run(SAMPLE / "hippocampus_014_0000.nii.gz", "--out", preds / "hippocampus_014.nii.gz")
    assert code == 0, err
    shutil.copy(preds / "hippocampus_014.nii.gz", preds / "hippocampus_999.nii.gz")  # no reference for it
    code, stdout, err = run("-r", refs, "-p", preds, command=evaluate_app)
    assert code == 0 and "anterior" in stdout and "posterior" in stdout  # names from dataset.json
    assert "1 predictions without a reference, not scored: hippocampus_999" in err
    assert "1 references without a prediction, not scored: hippocampus_777" in err
    assert "among the cases the model trained on" not in err  # no model named: nothing known
    code, stdout, err = run("-r", refs, "-p", preds, "-m", "hippocampus", command=evaluate_app)
    assert code == 0 and "WARNING: 1 of 1 cases are among the cases the model trained on" in err


def test_help_names_what_to_give_not_python_types():
    code, stdout, _ = run("--help")
    assert code == 0 and "SCAN|FOLDER" in stdout and "LABEL[,LABEL]" in stdout
    assert "<list[" not in stdout and "list[Path]" not in stdout


def test_the_cohort_table_grows_as_the_run_goes_and_across_nights(bundle_dir, phantom_dir, drop, tmp_path):
    import csv

    out, table = tmp_path / "out", tmp_path / "cohort.csv"
    (drop / "broken.nii.gz").write_bytes(b"not a scan")
    line = [drop, "--model", bundle_dir, "--out", out, "--skip-existing", "--table", table]
    code, _, _ = run(*line)
    assert code == 1  # the broken scan
    shutil.copy(phantom_dir / "imagesTr" / "phantom_002_0000.nii.gz", drop)
    (drop / "broken.nii.gz").unlink()
    code, _, err = run(*line)
    assert code == 0, err
    rows = list(csv.DictReader(table.open()))
    assert [r["status"] for r in rows] == ["failed", "segmented", "segmented", "skipped", "skipped", "segmented"]
    assert "broken.nii.gz" in rows[0]["input"] and rows[0]["error"]
    assert float(rows[1]["organ_ml"]) > 0 and float(rows[1]["seconds"]) > 0 and rows[1]["node"]
    assert rows[1]["run"] != rows[-1]["run"]  # each night's rows say which run wrote them
    code, _, err = run(drop, "--out", tmp_path / "other", "--table", table)  # the shipped model: other labels
    assert code == 2 and "exists with other columns" in err


def test_a_parquet_table_holds_the_csv_rows_typed_and_grows_across_nights(bundle_dir, phantom_dir, drop, tmp_path):
    import csv

    pq = pytest.importorskip("pyarrow.parquet")
    out, table = tmp_path / "out", tmp_path / "cohort.parquet"
    (drop / "broken.nii.gz").write_bytes(b"not a scan")
    line = [drop, "--model", bundle_dir, "--out", out, "--skip-existing", "--table", table]
    code, _, _ = run(*line, "--stats", tmp_path / "s.json")
    assert code == 1
    (drop / "broken.nii.gz").unlink()
    shutil.copy(phantom_dir / "imagesTr" / "phantom_002_0000.nii.gz", drop)
    code, _, err = run(*line, "--table", tmp_path / "same.csv")  # --table twice: the last one counts
    assert code == 0, err
    code, _, err = run(*line)  # night 3 adds its rows to the Parquet table too
    assert code == 0, err
    data = pq.read_table(table)
    assert str(data.schema.field("organ_ml").type) == "double" and str(data.schema.field("flagged").type) == "bool"
    rows = data.to_pylist()
    assert [r["status"] for r in rows] == ["failed", "segmented", "segmented", "skipped", "skipped", "skipped"]
    assert rows[0]["error"] and rows[0]["organ_ml"] is None and rows[0]["flagged"] is None
    assert rows[1]["organ_ml"] > 0 and rows[1]["seconds"] > 0 and rows[1]["flagged"] is False
    csv_rows = list(csv.DictReader((tmp_path / "same.csv").open()))  # the same columns as the CSV
    assert list(csv_rows[0]) == data.schema.names
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]  # rewritten atomically
    code, _, err = run(drop, "--out", tmp_path / "other", "--table", table)  # the shipped model: other labels
    assert code == 2 and "exists with other columns" in err
    (tmp_path / "bad.parquet").write_text("a,b\n1,2\n")
    code, _, err = run(drop, "--model", bundle_dir, "--out", tmp_path / "x", "--table", tmp_path / "bad.parquet")
    assert code == 2 and "cannot be read as Parquet" in err and not (tmp_path / "x").exists()
    code, _, err = run(drop, "--model", bundle_dir, "--out", tmp_path / "x", "--table", tmp_path / "t.xlsx")
    assert code == 2 and "name a .csv or a .parquet file" in err


def test_a_run_killed_midway_leaves_a_table_of_what_is_done(bundle_dir, phantom_dir, tmp_path):
    import csv
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(30):
        shutil.copy(phantom_dir / "imagesTr" / f"phantom_00{i % 4}_0000.nii.gz", folder / f"case{i:02d}_0000.nii.gz")
    table, out = tmp_path / "t.csv", tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "imunet.runtime.app.cli", str(folder), "--model", str(bundle_dir),
                             "--out", str(out), "--table", str(table), "-q"])  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not table.exists() or len(table.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = list(csv.DictReader(table.open()))
    assert 2 <= len(rows) < 30
    for row in rows:  # every row whole, every output it names in place
        assert row["status"] == "segmented" and Path(row["output"]).is_file()


def test_a_list_of_scans_in_a_text_file_or_a_csv(bundle_dir, drop, tmp_path):
    (tmp_path / "list.txt").write_text(f"# tonight\n{drop / 'phantom_000_0000.nii.gz'}\n\nin/phantom_001_0000.nii.gz\n")
    code, stdout, err = run(tmp_path / "list.txt", "--model", bundle_dir, "--out", tmp_path / "a")
    assert code == 0 and "2 of 2 scans segmented" in stdout, err
    (tmp_path / "list.csv").write_text(f"patient,input\np1,{drop / 'phantom_001_0000.nii.gz'}\n")
    code, stdout, err = run(tmp_path / "list.csv", "--model", bundle_dir, "--out", tmp_path / "b")
    assert code == 0 and "1 of 1 scans segmented" in stdout, err
    (tmp_path / "bad.csv").write_text("path\nx.nii.gz\n")
    code, _, err = run(tmp_path / "bad.csv", "--model", bundle_dir, "--out", tmp_path / "c")
    assert code == 2 and "needs an 'input' column" in err


def test_the_command_line_starts_without_the_heavy_libraries():
    """--help, --version and refusals answer before any imaging, inference or validation library is
    imported (typer 0.29 would bring pydantic: 0.2 s of every command)."""
    import subprocess
    import sys

    heavy = "('numpy', 'SimpleITK', 'onnxruntime', 'openvino', 'pydantic')"
    code = ("import sys; from typer.testing import CliRunner; from imunet.runtime.app.cli import app; "
            f"CliRunner().invoke(app, ['--help']); print(sorted(m for m in {heavy} if m in sys.modules))")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr
