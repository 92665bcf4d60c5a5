"""Shipped models are chosen by name, the default is named (not the first in sorted order), and
--list-models says what each is for and how accurate it measured."""

import shutil

import pytest
from typer.testing import CliRunner

from imunet.runtime.app.cli import app
from imunet.runtime.contract import bundle as bundle_module
from imunet.runtime.contract.bundle import DEFAULT_MODEL, resolve_model, shipped_bundles
from imunet.runtime.errors import BundleError

from conftest import ROOT

runner = CliRunner()
SAMPLE = ROOT / "runtime" / "default" / "sample" / "hippocampus_014_0000.nii.gz"


def test_the_default_is_named_not_the_first_in_sorted_order(tmp_path, monkeypatch):
    shipped = tmp_path / "default"
    shipped.mkdir()
    (shipped / "aaa-first.imunet").mkdir()  # sorts before the default
    shutil.copytree(ROOT / "runtime" / "default" / "hippocampus.imunet", shipped / "hippocampus.imunet")
    monkeypatch.setattr(bundle_module, "SHIPPED", shipped)
    assert list(shipped_bundles()) == ["aaa-first", "hippocampus"]
    assert resolve_model(None) == shipped / "hippocampus.imunet" and DEFAULT_MODEL == "hippocampus"
    assert resolve_model("aaa-first") == shipped / "aaa-first.imunet"


def test_an_existing_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hippocampus").mkdir()  # a folder in the working directory called like the shipped model
    assert resolve_model("hippocampus") == (tmp_path / "hippocampus").relative_to(tmp_path)
    assert resolve_model("hippocampus").resolve() == tmp_path / "hippocampus"
    with pytest.raises(BundleError, match=r"nosuch: no such bundle folder, and not a shipped model \(shipped: .*hipp"):
        resolve_model("nosuch")


def test_run_selects_a_shipped_model_by_name(tmp_path):
    res = runner.invoke(app, [str(SAMPLE), "--model", "hippocampus", "--out", str(tmp_path / "o.nii.gz")])
    assert res.exit_code == 0, res.stderr
    assert "model hippocampus.imunet" in res.stdout and (tmp_path / "o.nii.gz").exists()
    res = runner.invoke(app, [str(SAMPLE), "--model", "no-such-model", "--out", str(tmp_path / "p.nii.gz")])
    assert res.exit_code == 2 and "not a shipped model" in res.stderr and not (tmp_path / "p.nii.gz").exists()


def test_list_models_names_modality_labels_and_accuracy():
    res = runner.invoke(app, ["--list-models"])
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("hippocampus (default): "))
    assert "MRI" in lines[head]
    assert lines[head + 1] == "  labels: anterior, posterior"
    assert lines[head + 2].startswith("  validation Dice: mean 0.8795 (anterior 0.8902, posterior 0.8688); measured on")


def test_organ_names_get_their_snomed_codes():
    from imunet.export.bundle import anatomy_codes

    codes = anatomy_codes({0: "background", 1: "Brainstem", 2: "Spinal_Cord", 3: "RightParotid", 4: "tumour"})
    assert codes[1]["type"] == {"scheme": "SCT", "value": "15926001", "meaning": "Brain stem"}
    assert codes[2]["type"]["value"] == "2748008" and codes[3]["type"]["meaning"] == "Parotid gland"
    assert codes[1]["category"]["meaning"] == "Anatomical Structure" and 4 not in codes and 0 not in codes
    assert codes[3]["modifier"]["meaning"] == "Right" and "modifier" not in codes[1]
    hippocampus = anatomy_codes({0: "background", 1: "anterior", 2: "posterior"}, "Hippocampus")
    assert {k: (c["type"]["meaning"], c["modifier"]["meaning"]) for k, c in hippocampus.items()} == {
        1: ("Hippocampus", "Anterior"), 2: ("Hippocampus", "Posterior")}  # fmt: skip
    assert anatomy_codes({1: "anterior"}, "Prostate") == {}  # a part named alone is no anatomy
