"""Bundles a hospital can trust: every file inside the bundle and hashed, and signatures that are
checked against trusted keys. Each crafted bundle must be refused with one line and no output."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from imunet.runtime.bundle import load_bundle, sha256_file
from imunet.runtime.cli import app
from imunet.runtime.errors import BackendError, BundleError

runner = CliRunner()


def crafted(bundle_dir, tmp_path, edit):
    """A copy of the bundle whose manifest ``edit`` changes; files it names are hashed for real."""
    b = shutil.copytree(bundle_dir, tmp_path / "b" / bundle_dir.name)
    m = json.loads((b / "manifest.json").read_text())
    edit(b, m)
    (b / "manifest.json").write_text(json.dumps(m))
    return b


def point_encoder_at(name):
    def edit(b, m):
        outside = b.parent / "outside.onnx"
        shutil.copy(b / "encoder.onnx", outside)
        m["graphs"]["encoder"]["file"] = name(outside)
        m["files"][name(outside)] = sha256_file(outside)

    return edit


def symlink_out(b, m):
    outside = b.parent / "outside.onnx"
    shutil.move(b / "encoder.onnx", outside)
    os.symlink(outside, b / "encoder.onnx")


def variant_out(b, m):
    shutil.copy(b / "decoder_int8.onnx", b.parent / "d.onnx")
    m["variants"]["decoder_int8"]["file"] = "../d.onnx"
    m["files"]["../d.onnx"] = sha256_file(b.parent / "d.onnx")


def engine_out(b, m):
    m["engines"] = [{"dir": "../engines", "gpu": "x", "compute_capability": "9.0", "tensorrt": "11.1.0",
                     "precision": "fp16", "graphs_sha256": {}}]  # fmt: skip


def files_out(b, m):
    m["files"]["../../../../etc/hostname"] = "0" * 64


def backslash(b, m):
    m["graphs"]["encoder"]["file"] = "..\\\\encoder.onnx"


CASES = {
    "parent": (point_encoder_at(lambda p: "../outside.onnx"), "outside the bundle folder"),
    "absolute": (point_encoder_at(lambda p: str(p)), "outside the bundle folder"),
    "symlink": (symlink_out, "is a link that leaves the bundle folder"),
    "variant": (variant_out, "variant decoder_int8 '../d.onnx', which is outside the bundle folder"),
    "engine": (engine_out, "engine folder '../engines', which is outside the bundle folder"),
    "files": (files_out, "outside the bundle folder"),
    "backslash": (backslash, "outside the bundle folder"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bundles_escaping_their_folder_are_refused(bundle_dir, phantom_dir, tmp_path, case):
    edit, message = CASES[case]
    b = crafted(bundle_dir, tmp_path, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(b)
    out = tmp_path / "seg.nii.gz"
    res = runner.invoke(
        app, [str(phantom_dir / "imagesTr" / "phantom_000_0000.nii.gz"), "--model", str(b), "--out", str(out)]
    )
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and message in res.stderr
    assert not out.exists()


def test_engines_must_be_hashed_to_be_named(bundle_dir, tmp_path):
    def unhashed_engine(b, m):
        (b / "engines" / "x").mkdir(parents=True)
        (b / "engines" / "x" / "encoder.plan").write_bytes(b"plan")
        m["engines"] = [{"dir": "engines/x", "gpu": "x", "compute_capability": "9.0", "tensorrt": "11.1.0",
                         "precision": "fp16", "graphs_sha256": {}}]  # fmt: skip

    with pytest.raises(BundleError, match="engine folder engines/x has no files covered by the manifest's sha256"):
        load_bundle(crafted(bundle_dir, tmp_path, unhashed_engine))


def test_graphs_are_hashed_as_they_are_loaded(bundle_dir, tmp_path):
    from imunet.runtime.backends import open_backend

    b = crafted(bundle_dir, tmp_path, lambda b, m: None)
    bundle = load_bundle(b)  # checked now; the file changes afterwards
    data = bytearray((b / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (b / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.onnx does not match its sha256"):
        open_backend(bundle, "ort-cpu", "fp32")


def test_graphs_with_external_data_are_refused(bundle_dir, tmp_path):
    onnx = pytest.importorskip("onnx")
    from imunet.export.bundle import finalize_manifest
    from imunet.runtime.backends import open_backend

    b = crafted(bundle_dir, tmp_path, lambda b, m: None)
    model = onnx.load(str(b / "decoder.onnx"))
    onnx.save(model, str(b / "decoder.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    finalize_manifest(b, load_bundle(b, verify=False).manifest)  # hashed like any file, and inside the bundle
    with pytest.raises(BackendError, match="graphs with external data files are not accepted"):
        open_backend(load_bundle(b), "ort-cpu", "fp32")


@pytest.fixture()
def keys(tmp_path):
    from imunet.export.signing import keygen

    (tmp_path / "trusted").mkdir()
    (tmp_path / "other").mkdir()
    site = keygen(tmp_path / "site.pem")
    other = keygen(tmp_path / "rogue.pem")
    shutil.copy(site[1], tmp_path / "trusted")
    shutil.copy(other[1], tmp_path / "other")
    return {"site": site, "rogue": other, "trusted": tmp_path / "trusted", "other": tmp_path / "other"}


def test_keygen_keeps_the_private_key_private(keys):
    private, public, fingerprint = keys["site"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.name == "site.pub.pem" and fingerprint.startswith("ed25519:")
    res = subprocess.run([sys.executable, "-m", "imunet.export.cli", "keygen", str(private)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2 and "exists; pass --overwrite" in res.stderr


def test_signed_bundles_run_with_trusted_keys_and_every_refusal_is_one_line(bundle_dir, phantom_dir, tmp_path, keys):
    from imunet.export.signing import read_private_key, sign_bundle

    scan = str(phantom_dir / "imagesTr" / "phantom_000_0000.nii.gz")
    signed = crafted(bundle_dir, tmp_path, lambda b, m: None)
    key = sign_bundle(signed, read_private_key(keys["site"][0]))
    assert key == keys["site"][2]

    def run(model, trusted, out):
        return runner.invoke(app, [scan, "--model", str(model), "--trusted-keys", str(trusted), "--out", str(out),
                                   "--stats", str(out) + ".json"])  # fmt: skip

    res = run(signed, keys["trusted"], tmp_path / "ok.nii.gz")
    assert res.exit_code == 0, res.stderr
    assert f"bundle signed by {key} (verified against the trusted keys)" in res.stdout
    assert json.loads((tmp_path / "ok.nii.gz.json").read_text())["signature"] == {"key": key, "verified": True}
    unsigned = bundle_dir
    changed = shutil.copytree(signed, tmp_path / "changed" / signed.name)
    m = json.loads((changed / "manifest.json").read_text())
    m["inference"]["overlap"] = 0.1
    (changed / "manifest.json").write_text(json.dumps(m))
    for model, trusted, message in [
        (unsigned, keys["trusted"], "bundle is not signed, and --trusted-keys requires a signature"),
        (signed, keys["other"], f"signed by {key}, which is not a key in {keys['other']}"),
        (changed, keys["trusted"], f"manifest.json was changed after it was signed by {key}"),
    ]:
        out = tmp_path / "refused.nii.gz"
        res = run(model, trusted, out)
        assert res.exit_code == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
        assert not out.exists()
    res = runner.invoke(app, [scan, "--model", str(signed), "--out", str(tmp_path / "plain.nii.gz")])
    assert res.exit_code == 0 and f"bundle signed by {key} (not checked: no --trusted-keys)" in res.stdout


def test_export_signs_what_it_writes(trained_run, tmp_path, keys):
    out = tmp_path / "s.imunet"
    cmd = [
        sys.executable,
        "-m",
        "imunet.export.cli",
        str(trained_run[0]),
        "--out",
        str(out),
        "--sign",
        str(keys["site"][0]),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"signed {out} with {keys['site'][2]}" in res.stdout
    assert load_bundle(out, trusted_keys=keys["trusted"]).signature.verified
    public = str(keys["trusted"] / "site.pub.pem")
    bad = subprocess.run([*cmd[:-1], public, "--overwrite"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "not an unencrypted PEM private key" in bad.stderr
