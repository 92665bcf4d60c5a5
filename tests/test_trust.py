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

from imunet.runtime.app.cli import app
from imunet.runtime.contract.bundle import load_bundle, sha256_file
from imunet.runtime.errors import BundleError

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


def externalise(graph, location):
    """Rewrite ONNX file ``graph`` so that its tensors' values live in ``location`` (external data)."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(graph))
    onnx.save(model, str(graph), save_as_external_data=True, location=location, size_threshold=1024)


def test_graphs_with_external_data_are_refused_even_when_the_data_is_hashed(bundle_dir, tmp_path):
    from imunet.export.bundle import hash_files

    b = crafted(bundle_dir, tmp_path, lambda b, m: None)
    externalise(b / "decoder.onnx", "weights.bin")
    m = json.loads((b / "manifest.json").read_text())
    m["files"] = hash_files(b)  # weights.bin hashed like any file, and inside the bundle
    assert "weights.bin" in m["files"]
    (b / "manifest.json").write_text(json.dumps(m))
    for verify in (True, False):
        with pytest.raises(BundleError, match=r"decoder.onnx keeps weights outside the graph \(tensor .* reads "
                                              r"'weights.bin'.*external data is not covered"):  # fmt: skip
            load_bundle(b, verify=verify)


@pytest.fixture()
def secret_bundle(bundle_dir, tmp_path, keys, monkeypatch):
    """The probe's attack: a signed bundle whose encoder reads a tensor from ``secret.bin`` in the
    working folder, that file present there and able to change the output."""
    from imunet.export.signing import read_private_key, sign_bundle

    b = crafted(bundle_dir, tmp_path, lambda b, m: None)
    externalise(b / "encoder.onnx", "secret.bin")
    work = tmp_path / "work"
    work.mkdir()
    shutil.move(b / "secret.bin", work / "secret.bin")  # outside the bundle: no hash, no signature covers it
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["encoder.onnx"] = sha256_file(b / "encoder.onnx")
    (b / "manifest.json").write_text(json.dumps(m))
    sign_bundle(b, read_private_key(keys["site"][0]))
    monkeypatch.chdir(work)
    return b


@pytest.mark.parametrize("backend", ["auto", "ort-cpu", "openvino", "ort-cuda", "ort-trt", "tensorrt"])
def test_a_signed_bundle_cannot_read_weights_from_the_working_folder(secret_bundle, phantom_dir, tmp_path, keys,
                                                                      backend):  # fmt: skip
    """Refused in the bundle loader, so no backend (TensorRT included) ever opens the graph: the
    refusal is the same line whatever backend was asked for, and whether or not it is installed."""
    scan = str(phantom_dir / "imagesTr" / "phantom_000_0000.nii.gz")
    out = tmp_path / "o.nii.gz"
    res = runner.invoke(app, [scan, "--model", str(secret_bundle), "--trusted-keys", str(keys["trusted"]),
                              "--backend", backend, "--out", str(out)])  # fmt: skip
    assert res.exit_code == 2, res.stdout + res.stderr
    assert res.stderr.count("\n") == 1 and "encoder.onnx keeps weights outside the graph" in res.stderr
    assert "'secret.bin'" in res.stderr and "Traceback" not in res.stderr and not out.exists()
    assert "verified against the trusted keys" not in res.stdout


def test_the_secret_file_really_changes_what_the_libraries_compute(secret_bundle):
    """Why the refusal matters: onnxruntime and OpenVINO, given the graph's bytes, read ``secret.bin``
    from the working folder. Without the bundle check the output would follow that unsigned file."""
    import io

    import numpy as np

    ort = pytest.importorskip("onnxruntime")
    data = (secret_bundle / "encoder.onnx").read_bytes()
    m = json.loads((secret_bundle / "manifest.json").read_text())
    x = np.random.default_rng(0).standard_normal(m["graphs"]["encoder"]["inputs"]["image"]).astype(np.float32)

    def run_all():
        out = [ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]]
        try:
            import openvino as ov
        except ImportError:
            return out
        core = ov.Core()
        return [*out, next(iter(core.compile_model(core.read_model(io.BytesIO(data)), "CPU")([x]).values()))]

    first = run_all()
    secret = bytearray(open("secret.bin", "rb").read())
    secret[: len(secret) // 2] = bytes(len(secret) // 2)
    open("secret.bin", "wb").write(bytes(secret))
    for before, after in zip(first, run_all()):
        assert not np.allclose(before, after)


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
    assert res.exit_code == 0 and "bundle carries a signature (not checked: no --trusted-keys)" in res.stdout
    assert key not in res.stdout  # an unchecked .sig's key is a claim anyone can write


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
