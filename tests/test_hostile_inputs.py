"""What an attacker's or an unlucky hospital's input must not do: write over an input or over
another output. Each is refused before any work, in one line, with every file intact."""

import shutil

import pytest
from typer.testing import CliRunner

from imunet.runtime.app.cli import app

from conftest import ROOT

runner = CliRunner()
SAMPLE = ROOT / "runtime" / "default" / "sample" / "hippocampus_014_0000.nii.gz"


@pytest.fixture()
def scan(tmp_path):
    return shutil.copy(SAMPLE, tmp_path / "scan_0000.nii.gz")


def refused(args, *files, message):
    before = {f: f.read_bytes() for f in files if f.exists()}
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert "[1/1]" not in res.stdout  # refused before any scan was segmented
    for f, data in before.items():
        assert f.read_bytes() == data, f"{f} changed"
    return res


def test_stats_naming_the_label_map_is_refused(scan, tmp_path):
    out = tmp_path / "o.nii.gz"
    refused([scan, "--out", out, "--stats", out], scan, message="would be written twice")
    assert not out.exists()
    out.write_bytes(b"an earlier result")
    refused([scan, "--out", out, "--stats", out, "--overwrite"], scan, out, message="would be written twice")


@pytest.mark.parametrize("option", ["--stats", "--preview"])
def test_an_input_is_never_written_over_even_with_overwrite(scan, tmp_path, option):
    refused([scan, "--out", tmp_path / "o.nii.gz", option, scan, "--overwrite"], scan,
            message="is the input")  # fmt: skip
    assert not (tmp_path / "o.nii.gz").exists()


def test_the_label_map_written_over_its_own_scan_is_refused(scan):
    refused([scan, "--out", scan, "--overwrite"], scan, message="is the input")


def test_masks_that_clash_with_the_label_map_are_refused(scan, tmp_path):
    """A label called like the output's own name cannot shadow it: two outputs, one path."""
    out = tmp_path / "o.nii.gz"
    res = runner.invoke(app, [str(scan), "--out", str(out), "--masks", "--stats", str(tmp_path / "o_anterior.nii.gz")])
    assert res.exit_code == 2 and "would be written twice" in res.stderr
