"""The GPU path, checked where it can be without a GPU: fp16 graphs (run by onnxruntime on the CPU),
provider checks, TensorRT options, profiles and engine records. The engine build itself is tested
in test_export.py and skips without a GPU."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from imunet.runtime.backends.ort import OPT_POINTS, check_provider, trt_cache_dir, trt_provider_options
from imunet.runtime.contract.bundle import load_bundle
from imunet.runtime.errors import BackendError

from conftest import ROOT

onnx = pytest.importorskip("onnx")


def test_fp16_decoder_keeps_the_gather_and_the_encoding_in_float32(bundle_dir):
    from imunet.export.onnx import fp16_decoder_problems

    assert fp16_decoder_problems(bundle_dir / "decoder_fp16.onnx") == []
    model = onnx.shape_inference.infer_shapes(onnx.load(str(bundle_dir / "decoder_fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    trig = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert len(trig) == 2 and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in trig)
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert matmuls and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT16 for n in matmuls)  # the MLP is fp16
    assert fp16_decoder_problems(bundle_dir / "decoder.onnx") == ["no cast to float16: not an fp16 graph"]


def test_fp16_graphs_replace_their_fp32_twins_one_for_one(bundle_dir, unet_bundle_dir):
    for b in (bundle_dir, unet_bundle_dir):
        m = load_bundle(b).manifest
        for graph, spec in m.graphs.items():
            variant = m.variants[f"{graph}_fp16"]
            assert variant.precision == "fp16" and variant.replaces == graph
            fp32, fp16 = (onnx.load(str(b / f)) for f in (spec.file, variant.file))
            io = [[(v.name, v.type.tensor_type.elem_type) for v in g] for g in (fp32.graph.input, fp32.graph.output)]
            assert io == [
                [(v.name, v.type.tensor_type.elem_type) for v in g] for g in (fp16.graph.input, fp16.graph.output)
            ]
            assert variant.parity["argmax_agreement"] >= 0.99


def test_fp16_on_the_cpu_gives_the_labels_of_fp32(bundle_dir, unet_bundle_dir, phantom_dir):
    import SimpleITK as sitk

    from imunet.runtime import Segmenter
    from imunet.runtime.imaging.io import read_image

    image = read_image(phantom_dir / "imagesTr" / "phantom_004_0000.nii.gz")
    for b in (bundle_dir, unet_bundle_dir):
        fp32 = Segmenter(b, backend="ort-cpu", precision="fp32")
        fp16 = Segmenter(b, backend="ort-cpu", precision="fp16")
        assert fp16.backend.precision == "fp16" and fp16.last_stats == {}
        a, c = (sitk.GetArrayFromImage(s.predict(image)) for s in (fp32, fp16))
        assert (a == c).mean() >= 0.999
        assert fp16.last_stats["precision"] == "fp16"


def test_a_session_without_the_provider_it_asked_for_is_refused():
    check_provider(["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDAExecutionProvider", "encoder")
    with pytest.raises(BackendError, match="gave the decoder graph CPUExecutionProvider instead of CUDAExecution"):
        check_provider(["CPUExecutionProvider"], "CUDAExecutionProvider", "decoder")


def test_tensorrt_provider_options_profile_the_points_and_key_the_cache(bundle_dir, tmp_path, monkeypatch):
    bundle = load_bundle(bundle_dir)
    dec = trt_provider_options("decoder", tmp_path, 65536)
    assert dec["trt_profile_min_shapes"] == "points:1x3" and dec["trt_profile_max_shapes"] == "points:65536x3"
    assert dec["trt_profile_opt_shapes"] == f"points:{OPT_POINTS}x3"
    assert "trt_fp16_enable" not in dec  # precision is the graph's, never a builder flag
    assert "trt_profile_min_shapes" not in trt_provider_options("encoder", tmp_path, 65536)
    monkeypatch.setenv("IMUNET_CACHE", str(tmp_path))
    a, b = trt_cache_dir(bundle, "1.32.0", "10.13.0"), trt_cache_dir(bundle, "1.32.0", "11.1.0")
    assert a != b and a.parent == b.parent == tmp_path / "ort-trt" and "trt10.13.0" in a.name
    changed = replace(
        bundle, manifest=replace(bundle.manifest, files={**bundle.manifest.files, "encoder.onnx": "0" * 64})
    )
    assert trt_cache_dir(changed, "1.32.0", "10.13.0") != a


def test_points_profiles_are_validated_before_anything_is_built(trained_run, tmp_path):
    from imunet.export.tensorrt import check_points_profile

    assert check_points_profile((1, 16384, 65536)) == (1, 16384, 65536)
    with pytest.raises(ValueError, match="min 1, opt 70000, max 65536"):
        check_points_profile((1, 70000, 65536))
    out = tmp_path / "p.imunet"
    cmd = [sys.executable, "-m", "imunet.export.cli", str(trained_run[0]), "--out", str(out), "--opt-points", "70000"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--opt-points must be between 1 and --max-points (65536)" in res.stderr
    assert not out.exists()


def test_strongly_typed_networks_on_tensorrt_10_and_11():
    from types import SimpleNamespace

    from imunet.export.tensorrt import strongly_typed_network

    class Builder:
        def create_network(self, flags):
            return flags

    trt10 = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1))
    assert strongly_typed_network(Builder(), trt10) == 1 << 1
    trt_without_flag = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace())
    assert strongly_typed_network(Builder(), trt_without_flag) == 0


def weak_typing_uses(source: str) -> list[str]:
    """TensorRT's removed weak-typing API as code uses it (attributes, assignments, option keys), not
    as prose mentions it."""
    import ast

    removed = {"OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "set_output_type", "FULLY_CONNECTED"}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            base = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
            if node.attr in removed or (base == "BuilderFlag" and node.attr in ("FP16", "INT8", "BF16")):
                found.append(f"{base}.{node.attr}")
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute):
            to_trt = getattr(node.value.value, "id", "") == "trt"  # a layer's precision set to a TensorRT type
            if to_trt and any(isinstance(t, ast.Attribute) and t.attr == "precision" for t in node.targets):
                found.append("layer.precision = ...")
        if isinstance(node, ast.Dict):
            found += [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value == "trt_fp16_enable"]
    return found


def test_no_weak_typing_api_remains():
    code = "config.set_flag(trt.BuilderFlag.FP16)\nlayer.precision = trt.float32\nopts = {'trt_fp16_enable': True}"
    assert sorted(weak_typing_uses(code)) == ["BuilderFlag.FP16", "layer.precision = ...", "trt_fp16_enable"]
    for path in [*(ROOT / "export").glob("*.py"), *(ROOT / "runtime").rglob("*.py"), ROOT / "tools" / "gpu_smoke.py"]:
        assert weak_typing_uses(path.read_text()) == [], path


def test_empty_cuda_visible_devices_means_no_gpu():
    from imunet.runtime.backends.trt import _nvidia_smi_gpu

    with pytest.raises(BackendError, match="CUDA_VISIBLE_DEVICES is empty"):
        _nvidia_smi_gpu("")


def test_engine_records_are_replaced_on_rebuild_and_unusable_engines_reported_by_auto(bundle_dir, tmp_path):
    from imunet.export.bundle import finalize_manifest
    from imunet.export.tensorrt import with_engine
    from imunet.runtime.backends import open_backend
    from imunet.runtime.contract.manifest import EngineRecord

    b = tmp_path / bundle_dir.name
    shutil.copytree(bundle_dir, b)
    folder = "engines/NVIDIA-H200-trt11.1.0-fp16"
    (b / folder).mkdir(parents=True)
    for g in ("encoder", "decoder"):
        (b / folder / f"{g}.plan").write_bytes(b"not a real engine")
    m = load_bundle(b).manifest
    rec = EngineRecord(folder, "NVIDIA H200", "9.0", "11.1.0", "fp16", {"encoder": "a", "decoder": "b"}, (1, 16, 64))
    m = with_engine(with_engine(m, rec), replace(rec, build={"again": True}))
    assert len(m.engines) == 1 and m.engines[0].build == {"again": True}
    finalize_manifest(b, m)
    assert json.loads((b / "manifest.json").read_text())["files"][f"{folder}/encoder.plan"]  # hashed like every file
    backend = open_backend(load_bundle(b), "auto")
    assert backend.name in ("ort-cpu", "openvino")  # a CPU backend, with the reason the engines were passed over
    assert len(backend.skipped) == 1 and backend.skipped[0].startswith("tensorrt: ")


def test_gpu_smoke_runs_without_a_gpu_and_fails_honestly(bundle_dir):
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_smoke.py"), "--model", str(bundle_dir), "--size", "32", "48", "48"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = json.loads(res.stdout)
    rows = {(r["backend"], r["precision"]): r for r in report["rows"]}
    assert rows[("ort-cpu", "fp16")]["ok"] and rows[("ort-cpu", "fp16")]["scan_label_agreement"] >= 0.999
    have_gpu = any(r["ok"] for (k, _), r in rows.items() if k != "ort-cpu")
    assert res.returncode == (0 if all(r["ok"] for r in rows.values()) else 1)
    if not have_gpu:
        assert "FAILED" in res.stderr and np.all([not r["ok"] for (k, _), r in rows.items() if k != "ort-cpu"])
