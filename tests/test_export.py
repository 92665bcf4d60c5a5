"""Export: two graphs with parity recorded, the U-Net baseline, integrity, TensorRT checks."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from imunet.export.onnx import TENSORRT_OPS, graph_ops, unsupported_by_tensorrt  # noqa: E402
from imunet.runtime.contract.bundle import load_bundle  # noqa: E402
from imunet.runtime.contract.manifest import SCHEMA_PATH  # noqa: E402
from imunet.runtime.errors import BackendError, BundleError  # noqa: E402


def copy_bundle(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_implicit_bundle_records_parity_below_1e4(bundle_dir):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    diffs = m["parity"]["onnx"]["max_abs_diff"]
    assert set(diffs) == {"encoder", "decoder"}
    assert max(diffs.values()) < 1e-4 and m["parity"]["onnx"]["passed"] is True
    assert m["model_kind"] == "implicit" and m["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert set(m["files"]) == {
        "encoder.onnx",
        "decoder.onnx",
        "decoder_int8.onnx",
        "encoder_fp16.onnx",
        "decoder_fp16.onnx",
    }
    assert m["graphs"]["decoder"]["inputs"]["points"] == ["N", 3]
    int8 = m["variants"]["decoder_int8"]
    assert int8["replaces"] == "decoder" and int8["parity"]["argmax_agreement"] >= 0.99
    assert m["provenance"]["versions"]["torch"]


def test_unet_bundle_exports_one_graph_with_parity(unet_bundle_dir):
    m = json.loads((unet_bundle_dir / "manifest.json").read_text())
    assert m["model_kind"] == "unet" and set(m["graphs"]) == {"model"}
    assert m["parity"]["onnx"]["max_abs_diff"]["model"] < 1e-4


def test_manifests_validate_against_the_schema(bundle_dir, unet_bundle_dir):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_PATH.read_text())
    for b in (bundle_dir, unet_bundle_dir):
        jsonschema.validate(json.loads((b / "manifest.json").read_text()), schema)
    bad = json.loads((bundle_dir / "manifest.json").read_text())
    bad["inference"]["overlap"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_decoder_graph_has_dynamic_points_and_the_gather_inside(bundle_dir):
    model = onnx.load(str(bundle_dir / "decoder.onnx"))
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["f0", "f1", "f2", "f3", "points"]
    dims = inputs["points"].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and dims[1].dim_value == 3
    ops = graph_ops(bundle_dir / "decoder.onnx")
    assert {"Gather", "Sin", "Cos", "Floor"} <= ops
    assert "ReduceL2" not in ops  # weight normalisation was folded
    # two concatenations: sin with cos, and the gathered features with the encoding; the re-injection
    # is a sum (SplitReinjectMLP), not a third one
    assert sum(n.op_type == "Concat" for n in model.graph.node) == 2


def test_feature_layouts_agree_and_the_manifest_records_them(trained_run, bundle_dir, tmp_path):
    import onnxruntime as ort

    from imunet.export.bundle import ExportOptions, write_bundle

    def export(name, layout):
        return write_bundle(trained_run[0], tmp_path / name, ExportOptions(feature_layout=layout), log=lambda _m: None)

    first, last = export("first.imunet", "channels_first"), export("last.imunet", "channels_last")
    outputs = {}
    for b, layout in ((first, ["channels_first"] * 4), (last, ["channels_last"] * 4), (bundle_dir, None)):
        m = json.loads((b / "manifest.json").read_text())
        if layout is not None:
            assert m["decoder"]["feature_layout"] == layout
        enc = ort.InferenceSession(str(b / "encoder.onnx"), providers=["CPUExecutionProvider"])
        declared = m["graphs"]["encoder"]["outputs"]
        assert {o.name: list(o.shape) for o in enc.get_outputs()} == declared  # the manifest says the truth
        dec = ort.InferenceSession(str(b / "decoder.onnx"), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        patch = m["patch_size"]
        image = rng.normal(size=(1, 1, *patch)).astype(np.float32)
        feats = dict(zip(declared, enc.run(list(declared), {"image": image})))
        pts = np.stack([rng.integers(0, s, 2000) for s in patch], axis=1).astype(np.int32)
        outputs[b.name] = dec.run(["logits"], {**feats, "points": pts})[0]
    default = json.loads((bundle_dir / "manifest.json").read_text())["decoder"]["feature_layout"]
    assert default == ["channels_first", "channels_last", "channels_last", "channels_last"]
    assert np.abs(outputs["first.imunet"] - outputs["last.imunet"]).max() < 1e-5
    assert np.abs(outputs["first.imunet"] - outputs[bundle_dir.name]).max() < 1e-5


def test_changed_byte_in_decoder_is_refused(bundle_dir, tmp_path):
    b = copy_bundle(bundle_dir, tmp_path)
    data = bytearray((b / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.onnx does not match its sha256"):
        load_bundle(b)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update(format_version=99), "format version 99 is not supported"),
        (lambda m: m.update(format="something"), "not an imunet bundle"),
        (lambda m: m.pop("files"), "lists no files"),
        (lambda m: m["labels"].pop("2"), None),
    ],
)
def test_broken_manifests_are_refused(bundle_dir, tmp_path, edit, message):
    b = copy_bundle(bundle_dir, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    edit(m)
    (b / "manifest.json").write_text(json.dumps(m))
    if message is None:  # labels no longer match the decoder's 3 outputs: refused when opened
        from imunet.runtime.backends import open_backend

        with pytest.raises(BackendError, match="manifest lists 2 labels but the decoder graph outputs 3"):
            open_backend(load_bundle(b), "ort-cpu")
    else:
        with pytest.raises(BundleError, match=message):
            load_bundle(b)


def test_missing_graph_file_is_refused(bundle_dir, tmp_path):
    b = copy_bundle(bundle_dir, tmp_path)
    (b / "encoder.onnx").unlink()
    with pytest.raises(BundleError, match="encoder.onnx is missing"):
        load_bundle(b)


def test_tensorrt_operator_list_flags_unsupported_ops(tmp_path, bundle_dir, unet_bundle_dir):
    from onnx import TensorProto, helper

    for b in (bundle_dir, unet_bundle_dir):
        for g in json.loads((b / "manifest.json").read_text())["graphs"].values():
            assert unsupported_by_tensorrt(b / g["file"]) == []
    node = helper.make_node("NonZero", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, None])],
    )
    path = tmp_path / "nz.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert unsupported_by_tensorrt(path) == ["NonZero"]
    assert "Mod" not in TENSORRT_OPS and "NonZero" not in TENSORRT_OPS and "Gather" in TENSORRT_OPS


def test_export_cli_trt_without_tensorrt_fails_in_one_line_and_keeps_the_bundle(trained_run, tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; this checks the machine without it")
    except ImportError:
        pass
    out = tmp_path / "t.imunet"
    res = subprocess.run(
        [sys.executable, "-m", "imunet.export.cli", str(trained_run[0]), "--out", str(out), "--trt", "fp16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 3
    assert res.stderr.strip().splitlines() == [
        # the fixture run validates on 2 cases: too few to calibrate the Dice estimate, and it says so
        "note: the Dice estimate is uncalibrated: the run has fewer than 5 validation cases; "
        "--calibration-from TWIN.imunet borrows a split twin's",
        f"imunet-export: --trt fp16: TensorRT is not installed (pip install 'imunet[gpu]'); "
        f"the ONNX bundle at {out} is complete without engines",
    ]
    load_bundle(out)
    res = subprocess.run(
        [sys.executable, "-m", "imunet.export.cli", str(trained_run[0]), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "exists; pass --overwrite" in res.stderr


def test_export_cli_refuses_an_unknown_feature_layout_before_writing(trained_run, tmp_path):
    out = tmp_path / "x.imunet"
    res = subprocess.run(
        [sys.executable, "-m", "imunet.export.cli", str(trained_run[0]), "--out", str(out), "--feature-layout", "nhwc"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "--feature-layout must be auto, channels_first or channels_last" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_export_overlap_becomes_the_bundles_default_and_a_bad_one_is_refused(trained_run, tmp_path):
    from imunet.runtime import Segmenter

    out = tmp_path / "o.imunet"
    cmd = [sys.executable, "-m", "imunet.export.cli", str(trained_run[0]), "--out", str(out)]
    res = subprocess.run([*cmd, "--overlap", "1.5"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "overlap must be in [0, 1), got 1.5" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()
    res = subprocess.run([*cmd, "--overlap", "0.25"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert load_bundle(out).manifest.inference.overlap == 0.25
    with Segmenter(out) as seg:
        assert seg.settings.overlap == 0.25
    with Segmenter(out, overlap=0.3) as seg:  # the runtime's option still wins
        assert seg.settings.overlap == 0.3


def _gpu_and_tensorrt() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed"
    from imunet.runtime.backends.trt import gpu_info

    try:
        gpu_info()
    except BackendError as exc:
        return str(exc)
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_and_tensorrt() is not None, reason=f"needs a GPU and TensorRT: {_gpu_and_tensorrt()}")
def test_tensorrt_engines_build_and_match_onnxruntime_fp32(trained_run, tmp_path):
    out = tmp_path / "g.imunet"
    cmd = [sys.executable, "-m", "imunet.export.cli", str(trained_run[0]), "--out", str(out)]
    for precision in ("fp32", "fp16"):
        res = subprocess.run([*cmd, "--overwrite", "--trt", precision], capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr
        bundle = load_bundle(out)
        (rec,) = [e for e in bundle.manifest.engines if e.precision == precision]
        assert rec.parity["reference"] == "onnxruntime-cpu fp32"
        assert rec.parity["argmax_agreement"] > 0.99 and rec.parity["max_abs_prob_diff"] < 2e-2


def test_engines_for_another_gpu_tensorrt_or_graph_are_refused(bundle_dir):
    from dataclasses import replace

    from imunet.runtime.backends.trt import GpuInfo, select_engine
    from imunet.runtime.contract.manifest import EngineRecord

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    graphs = {n: m.files[g.file] for n, g in m.graphs.items()}
    h100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
    rec = EngineRecord("engines/NVIDIA-H100-80GB-HBM3-trt10.3.0-fp32", h100.name, "9.0", "10.3.0", "fp32", graphs)
    with pytest.raises(BackendError, match="bundle has no TensorRT engines"):
        select_engine(bundle, h100, "10.3.0")
    with_engine = replace(bundle, manifest=replace(m, engines=(rec,)))
    assert select_engine(with_engine, h100, "10.3.0") is rec
    with pytest.raises(BackendError, match=r"was built for NVIDIA H100 80GB HBM3 \(sm 9.0\)"):
        select_engine(with_engine, GpuInfo("NVIDIA A100-SXM4-40GB", "8.0"), "10.3.0")
    with pytest.raises(BackendError, match="was built with TensorRT 10.3.0, this is 11.1.0"):
        select_engine(with_engine, h100, "11.1.0")
    with pytest.raises(BackendError, match="is fp32, not fp16"):
        select_engine(with_engine, h100, "10.3.0", "fp16")
    changed = replace(with_engine, manifest=replace(with_engine.manifest, files={**m.files, "decoder.onnx": "0" * 64}))
    with pytest.raises(BackendError, match="built from other graphs than the bundle's"):
        select_engine(changed, h100, "10.3.0")


def test_int8_decoder_is_used_on_the_cpu_and_agrees_with_fp32(bundle_dir, phantom_dir):
    import SimpleITK as sitk

    from imunet.runtime import Segmenter
    from imunet.runtime.imaging.io import read_image

    image = read_image(phantom_dir / "imagesTr" / "phantom_002_0000.nii.gz")
    fp32 = Segmenter(bundle_dir, backend="ort-cpu", precision="fp32", mode="dense")
    int8 = Segmenter(bundle_dir, backend="ort-cpu", mode="dense")  # auto: int8 on the CPU
    assert fp32.backend.precision == "fp32" and int8.backend.precision == "decoder int8"
    a = sitk.GetArrayFromImage(fp32.predict(image))
    b = sitk.GetArrayFromImage(int8.predict(image))
    assert (a == b).mean() >= 0.995
    assert int8.last_stats["precision"] == "decoder int8"


def test_int8_is_refused_where_it_cannot_run(unet_bundle_dir, bundle_dir, tmp_path):
    from imunet.runtime.backends import open_backend

    with pytest.raises(BackendError, match="bundle has no int8 graphs"):
        open_backend(load_bundle(unet_bundle_dir), "ort-cpu", "int8")
    with pytest.raises(BackendError, match="unknown precision"):
        open_backend(load_bundle(bundle_dir), "ort-cpu", "int4")


def test_manifest_reads_the_feature_layout_and_refuses_a_decoder_without_one(bundle_dir, tmp_path):
    assert load_bundle(bundle_dir).manifest.feature_layout == ("channels_first",) + ("channels_last",) * 3
    old = copy_bundle(bundle_dir, tmp_path)
    m = json.loads((old / "manifest.json").read_text())
    del m["decoder"]["feature_layout"]  # as exporters before format version 1's last change wrote it
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"decoder.feature_layout \(\) does not fit"):
        load_bundle(old)


def test_fp16_stored_weights_halve_the_graphs_and_keep_the_labels(trained_run, bundle_dir, phantom_dir, tmp_path):
    """The fp32 graphs with float16-stored weights (float32 arithmetic): a smaller bundle whose labels
    are those of the exact one, and the check recorded in the manifest."""
    import SimpleITK as sitk

    from imunet.export.bundle import ExportOptions, write_bundle
    from imunet.runtime import Segmenter
    from imunet.runtime.imaging.metrics import dice

    small = write_bundle(
        trained_run[0], tmp_path / "small.imunet", ExportOptions(fp16_weights=True), log=lambda _m: None
    )
    for graph in ("encoder.onnx", "decoder.onnx"):
        ratio = (small / graph).stat().st_size / (bundle_dir / graph).stat().st_size
        assert 0.45 < ratio < 0.65, (graph, ratio)
    stored = load_bundle(small).manifest.parity["fp16_weights"]
    assert stored["argmax_agreement"] >= 0.999 and stored["max_abs_logit_diff"] < 0.05
    exact, half = Segmenter(bundle_dir, backend="ort-cpu", precision="fp32"), Segmenter(small, backend="ort-cpu",
                                                                                         precision="fp32")  # fmt: skip
    for i in range(3):
        scan = sitk.ReadImage(str(phantom_dir / "imagesTr" / f"phantom_00{i}_0000.nii.gz"))
        a, b = (sitk.GetArrayFromImage(s.predict(scan)) for s in (exact, half))
        assert (a != b).mean() < 1e-3
        assert dice(a, b, 1) > 0.99


def test_int8_decoder_gives_a_point_the_same_logits_in_any_call(bundle_dir):
    import numpy as np
    import onnx
    import onnxruntime as ort

    m = json.loads((bundle_dir / "manifest.json").read_text())
    patch = m["patch_size"]
    ranges = m["variants"]["decoder_int8"]["parity"]["activation_ranges"]
    assert ranges and all(lo <= 0 <= hi and hi > lo for lo, hi in ranges.values())
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    enc, dec, ref = (
        ort.InferenceSession(str(bundle_dir / f), opts, providers=["CPUExecutionProvider"])
        for f in ("encoder.onnx", "decoder_int8.onnx", "decoder.onnx")
    )
    ops = {n.op_type for n in onnx.load(str(bundle_dir / "decoder_int8.onnx")).graph.node}
    assert "DynamicQuantizeLinear" not in ops and "MatMulIntegerToFloat" in ops
    rng = np.random.default_rng(3)
    names = [o.name for o in enc.get_outputs()]
    feats = dict(zip(names, enc.run(names, {"image": rng.normal(size=(1, 1, *patch)).astype(np.float32)})))
    points = np.stack([rng.integers(0, s, 3000) for s in patch], 1).astype(np.int32)
    whole = dec.run(["logits"], {**feats, "points": points})[0]
    for part in (points[:7], points[1000:1500], points[::3]):
        alone = dec.run(["logits"], {**feats, "points": part})[0]
        idx = [int(np.flatnonzero((points == p).all(1))[0]) for p in part]
        np.testing.assert_array_equal(alone, whole[idx])
    exact = ref.run(["logits"], {**feats, "points": points})[0]
    assert (whole.argmax(1) == exact.argmax(1)).mean() >= 0.99


def test_int8_decoder_ranges_leave_out_the_extreme_tail_exactly(bundle_dir, tmp_path):
    """The calibrated range of each activation leaves ``tail`` of its values outside at each end,
    computed exactly while keeping only the extremes; tail 0 is the minimum and maximum."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from imunet.export.decoder_quantization import activation_ranges, quantize_dynamic_decoder

    m = json.loads((bundle_dir / "manifest.json").read_text())
    patch = m["patch_size"]
    dyn = onnx.load(str(quantize_dynamic_decoder(bundle_dir / "decoder.onnx", tmp_path / "dyn.onnx")))
    enc = ort.InferenceSession(str(bundle_dir / "encoder.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    names = [o.name for o in enc.get_outputs()]
    feeds = []
    for n in (700, 700, 700):
        feats = dict(zip(names, enc.run(names, {"image": rng.normal(size=(1, 1, *patch)).astype(np.float32)})))
        feeds.append({**feats, "points": np.stack([rng.integers(0, s, n) for s in patch], 1).astype(np.int32)})
    acts = [n.input[0] for n in dyn.graph.node if n.op_type == "DynamicQuantizeLinear"]
    probe = onnx.ModelProto()
    probe.CopyFrom(dyn)
    probe.graph.output.extend(helper.make_tensor_value_info(a, TensorProto.FLOAT, None) for a in acts)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = {a: np.concatenate([v.ravel() for v in vs]) for a, *vs in zip(acts, *(sess.run(acts, f) for f in feeds))}
    tail = 1e-3
    ranges = activation_ranges(dyn, feeds, tail)
    for a, (lo, hi) in ranges.items():
        v = values[a]
        k = int(np.ceil(tail * v.size)) + 1
        assert hi == max(0.0, float(np.sort(v)[-k])) and lo == min(0.0, float(np.sort(v)[k - 1]))
        assert (v > hi).sum() <= tail * v.size + 1 and hi <= v.max()
    full = activation_ranges(dyn, feeds, 0.0)
    assert all(full[a] == (min(0.0, float(values[a].min())), max(0.0, float(values[a].max()))) for a in acts)
    assert any(ranges[a][1] < full[a][1] for a in acts)  # the tail was really left out somewhere


def test_int8_decoder_that_loses_dice_on_validation_cases_is_left_out(bundle_dir, trained_run, phantom_dir, tmp_path):
    import shutil

    import SimpleITK as sitk

    from imunet.export.int8_check import check_int8_decoder
    from imunet.runtime import Segmenter
    from imunet.runtime.contract.bundle import load_bundle

    val = json.loads((trained_run[0] / "split.json").read_text())["val"]
    kept, dropped = tmp_path / "kept.imunet", tmp_path / "dropped.imunet"
    shutil.copytree(bundle_dir, kept)
    shutil.copytree(bundle_dir, dropped)
    lines = []
    figures = check_int8_decoder(kept, phantom_dir, val, lines.append)
    assert figures["kept"] and figures["cases"] == len(val) and figures["fp32_mean_dice"] > 0.5
    assert abs(figures["mean_dice"] - figures["fp32_mean_dice"]) <= 0.005
    stored = load_bundle(kept).manifest.variants["decoder_int8"].parity["validation"]
    assert stored["mean_dice"] == figures["mean_dice"] and stored["cases"] == len(val)
    with Segmenter(kept, backend="ort-cpu") as seg:
        assert seg.backend.precision != "fp32"  # auto still runs the int8 decoder
    # a tolerance below any loss stands in for a decoder that loses Dice: it leaves the bundle
    figures = check_int8_decoder(dropped, phantom_dir, val, lines.append, max_loss=-1.0)
    assert figures["kept"] is False and not (dropped / "decoder_int8.onnx").exists()
    assert "left out of the bundle" in lines[-1]
    loaded = load_bundle(dropped)  # hashes checked: the manifest no longer lists the file
    assert "decoder_int8" not in loaded.manifest.variants
    with Segmenter(dropped, backend="ort-cpu") as seg:
        assert seg.backend.precision == "fp32"
        scan = sitk.ReadImage(str(phantom_dir / "imagesTr" / f"{val[0]}_0000.nii.gz"))
        assert sitk.GetArrayFromImage(seg.predict(scan)).max() > 0


def test_int8_decoder_without_the_training_data_scales_per_call(trained_run, tmp_path):
    import shutil

    from imunet.export.bundle import write_bundle

    run = tmp_path / "moved_run"
    shutil.copytree(trained_run[0], run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["dataset"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(cfg))
    lines = []
    m = json.loads((write_bundle(run, tmp_path / "b.imunet", log=lines.append) / "manifest.json").read_text())
    int8 = m["variants"]["decoder_int8"]
    assert "dynamic" in int8["quantization"] and "activation_ranges" not in int8["parity"]
    assert int8["parity"]["argmax_agreement"] >= 0.99
    assert any("training data not found" in line for line in lines)
