"""The benchmark tools: evaluation, volumes, the harness, on phantoms with known labels."""

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from imunet.runtime import Segmenter
from imunet.runtime.imaging.io import read_image
from imunet.runtime.imaging.metrics import dice, hd95


def test_evaluate_matches_direct_computation(bundle_dir, phantom_dir):
    from evaluate import evaluate, pair_cases

    pairs = pair_cases(phantom_dir / "imagesTr", phantom_dir / "labelsTr", {"phantom_001", "phantom_003"})
    assert [p[0] for p in pairs] == ["phantom_001", "phantom_003"]
    res = evaluate(bundle_dir, phantom_dir / "imagesTr", phantom_dir / "labelsTr", only={"phantom_001", "phantom_003"})
    seg = Segmenter(bundle_dir, backend="ort-cpu")
    d = []
    for _, img, lbl in pairs:
        pred = sitk.GetArrayFromImage(seg.predict(read_image(img)))
        ref = sitk.GetArrayFromImage(read_image(lbl))
        d.append(dice(pred, ref, 1))
    assert res["cases"] == 2 and np.isclose(res["labels"]["organ"]["dice_mean"], np.mean(d))
    assert res["labels"]["organ"]["dice_mean"] > 0.7


def test_hd95_on_known_shapes():
    a = np.zeros((20, 20, 20), np.uint8)
    b = np.zeros_like(a)
    a[5:15, 5:15, 5:15] = 1
    b[5:15, 5:15, 7:17] = 1  # shifted by 2 voxels along x
    assert hd95(a, a, 1, (1.0, 1.0, 1.0)) == 0.0
    assert hd95(a, b, 1, (1.0, 1.0, 1.0)) == 2.0
    assert hd95(a, b, 1, (1.0, 1.0, 3.0)) == 6.0  # spacing (z, y, x): x is 3 mm
    assert np.isnan(hd95(a, np.zeros_like(a), 1, (1.0, 1.0, 1.0)))


def test_packed_volumes_keep_labels_on_their_crops_and_fill_the_volume():
    from volumes import pack as build

    rng = np.random.default_rng(3)
    crops = []
    for shape in [(9, 12, 10), (7, 10, 13), (11, 8, 9)]:
        img = rng.normal(size=shape).astype(np.float32)
        crops.append((img, (img > 0.8).astype(np.uint8) + (img > 1.6).astype(np.uint8)))
    image, label = build((30, 41, 37), crops, seed=1)
    assert image.shape == label.shape == (30, 41, 37)
    np.testing.assert_array_equal(label, (image > 0.8).astype(np.uint8) + (image > 1.6).astype(np.uint8))
    assert (image != 0).mean() > 0.4  # packed (these crops are tiny next to the 2-voxel gaps)
    again, _ = build((30, 41, 37), crops, seed=1)
    np.testing.assert_array_equal(image, again)


def test_table1_ratios_come_from_the_inputs():
    from table1 import rows

    ev = lambda d, s: {"labels": {"a": {"dice_mean": d}, "b": {"dice_mean": d - 0.1}}, "median_s_per_scan": s}  # noqa: E731
    train = {"implicit": {"median_step_s": 0.6, "peak_mb": 700.0}, "unet": {"median_step_s": 1.0, "peak_mb": 1000.0}}
    table = {name: (a, b) for name, a, b, _ in rows(ev(0.9, 0.07), ev(0.8, 0.1), train)}
    assert np.isclose(table["mean validation Dice"][0], 0.85) and np.isclose(table["mean validation Dice"][1], 0.75)
    assert table["inference, s per scan (median)"] == (0.07, 0.1)
    assert table["training, s per 100 steps"] == (60.0, 100.0)
    assert table["peak training memory, MB"] == (700.0, 1000.0)


def test_mosaic_dataset_is_a_trainable_dataset_of_the_named_cases(tmp_path):
    import pytest
    from mosaic_dataset import write_dataset

    from imunet.data import read_dataset

    from conftest import HIPPO

    if not HIPPO.is_dir():
        pytest.skip(f"{HIPPO} is not present")
    cases = ["hippocampus_001", "hippocampus_003"]
    names = write_dataset(tmp_path / "m", HIPPO, cases, 2, (24, 60, 60), seed=5)
    info = read_dataset(tmp_path / "m")
    assert [c.name for c in info.cases] == names == ["mosaic_000", "mosaic_001"]
    assert info.labels == read_dataset(HIPPO).labels and info.modality == "MRI"
    for case in info.cases:
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(case.image)))
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        assert img.shape == lab.shape == (24, 60, 60)
        assert set(np.unique(lab)) <= {0, 1, 2} and 0 < (lab > 0).mean() < 0.5
        assert (img != 0).mean() > 0.5  # crops packed in, not an empty volume
    with pytest.raises(SystemExit, match="already holds"):
        write_dataset(tmp_path / "m", HIPPO, cases, 1, (24, 60, 60))


def test_report_emit_prints_and_writes_the_same_json(tmp_path, capsys):
    import json

    from harness import emit

    out = tmp_path / "a" / "b" / "r.json"
    emit({"x": [1, 2], "y": {"z": 0.5}}, out)
    printed = capsys.readouterr().out
    assert json.loads(printed) == json.loads(out.read_text()) == {"x": [1, 2], "y": {"z": 0.5}}
    emit({"x": 1}, None)  # no file asked for: prints only
    assert json.loads(capsys.readouterr().out) == {"x": 1}


def test_harness_reads_the_machine_and_runs_a_fresh_process(tmp_path):
    from harness import fresh_process, machine

    m = machine()
    assert m["cpu"] and m["cores"] >= 1 and "numpy" in m["versions"]
    script = tmp_path / "child.py"
    script.write_text(
        "import json, os, sys\nprint('noise')\nprint(json.dumps({'pid': os.getpid(), 'args': sys.argv[1:]}))\n"
    )
    a, b = fresh_process(script, ["x"]), fresh_process(script, ["y"])
    assert a["args"] == ["x"] and b["args"] == ["y"] and a["pid"] != b["pid"]
    script.write_text("import sys\nsys.exit('broken')\n")
    import pytest

    with pytest.raises(SystemExit, match="broken"):
        fresh_process(script, [])


def test_bench_segment_config_syntax():
    from bench_segment import parse_config

    assert parse_config("a=x.imunet") == ("a", Path("x.imunet"), {})
    assert parse_config("b=x:precision=fp32,workers=1,tta=true") == (
        "b",
        Path("x"),
        {"precision": "fp32", "workers": 1, "tta": True},
    )
    import pytest

    with pytest.raises(SystemExit, match="NAME=PATH"):
        parse_config("nothing")


def test_bench_segment_scores_only_the_labels_a_case_annotated(tmp_path):
    import json

    import numpy as np
    from bench_segment import annotated_classes, score

    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2] = 1  # label 1 contoured; label 2 not contoured in this case (absent from the truth)
    pred = truth.copy()
    pred[3] = 2  # the model finds organ 2 where nobody drew it
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}}))
    (tmp_path / "annotated.json").write_text(json.dumps({"c1": ["a"]}))
    scored = annotated_classes(tmp_path, ["c1"])
    assert scored == [{1}]
    other = truth.copy()
    other[3] = 2  # a second case contouring both, so label 2 is among the classes scored
    assert score([pred], [truth], None, scored)["mean_dice"] == 1.0
    assert score([pred, other], [truth, other], None, scored + [None])["mean_dice"] == 1.0
    assert score([pred, other], [truth, other], None)["mean_dice"] == 0.75  # unannotated label 2 scored 0
    assert annotated_classes(tmp_path / "missing", ["c1"]) == [None]


def test_grouped_encoder_windows_cover_the_axis_with_fewer_voxels():
    from bench_encoder_windows import grouped_extents

    from imunet.runtime.kernels.windows import window_starts

    one = grouped_extents(512, 56, 0.3, 4, 1, 8)
    assert one == [56] * len(window_starts(512, 56, 0.3))  # the runtime's windows, one per owner box
    for k in (2, 4):
        grouped = grouped_extents(512, 56, 0.3, 4, k, 8)
        assert len(grouped) == -(-len(one) // k)
        assert all(e % 8 == 0 or e == 512 for e in grouped) and all(56 <= e <= 512 for e in grouped)
        assert sum(grouped) < sum(one)


def test_evaluate_scores_a_label_only_where_it_was_annotated(bundle_dir, phantom_dir):
    from evaluate import evaluate

    only = {"phantom_001", "phantom_003"}
    annotated = {"phantom_001": ["organ"], "phantom_003": ["organ", "lesion"]}
    res = evaluate(bundle_dir, phantom_dir / "imagesTr", phantom_dir / "labelsTr", only=only, annotated=annotated,
                   agreement=("dense", 1))  # fmt: skip
    assert res["labels"]["organ"]["cases"] == 2 and res["labels"]["lesion"]["cases"] == 1
    assert "lesion" not in res["per_case"]["phantom_001"]
    assert res["labels"]["lesion"]["dice_mean"] == res["per_case"]["phantom_003"]["lesion"]["dice"]
    assert list(res["agreement"]["foreground_agreement"]) == ["phantom_001"]
    assert 0.9 < res["agreement"]["foreground_agreement"]["phantom_001"] <= 1.0


def test_decoder_quantizations_compared_on_real_patches(bundle_dir, phantom_dir, tmp_path):
    from bench_decoder_quantization import compare, patches, quantize_static_decoder, session

    from imunet.export.decoder_quantization import quantize_dynamic_decoder
    from imunet.runtime.contract.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    graphs = {}
    for name, graph, precision in (("fp32", "decoder", None), ("shipped", "decoder", "int8"), ("enc", "encoder", None)):
        graphs[name] = tmp_path / f"{name}.onnx"
        graphs[name].write_bytes(bundle.read(bundle.graph_file(graph, precision)))
    encoder = session(str(graphs.pop("enc")), 1)
    rng = np.random.default_rng(0)
    data = patches(bundle, phantom_dir, ["phantom_001", "phantom_002", "phantom_003"], encoder, rng)
    graphs["dynamic"] = quantize_dynamic_decoder(graphs["fp32"], tmp_path / "dynamic.onnx")
    graphs["static"] = quantize_static_decoder(graphs["fp32"], tmp_path / "static.onnx", data[:2], "minmax")
    report = compare({name: session(str(path), 1) for name, path in graphs.items()}, data[2:])
    assert report["fp32"]["argmax_agreement_min"] == 1.0 and report["fp32"]["max_abs_logit_diff"] == 0.0
    for name in ("shipped", "static"):  # fixed scales: a point's logits are its own
        assert report[name]["batch_dependence_max_abs_logit"] == 0.0
    assert report["dynamic"]["batch_dependence_max_abs_logit"] > 0.0  # per-call scales: they depend on the call
    for name in ("shipped", "dynamic", "static"):
        assert report[name]["argmax_agreement_min"] > 0.97 and report[name]["max_abs_logit_diff"] > 0


def test_fp16_stored_weights_come_back_as_float32_initializers(bundle_dir, tmp_path):
    import onnx
    import onnxruntime as ort
    from bench_decoder_quantization import float32_weights
    from onnx import TensorProto

    from imunet.export.variants import store_weights_fp16

    stored = store_weights_fp16(bundle_dir / "decoder.onnx", tmp_path / "stored.onnx", min_elements=16)
    back = float32_weights(stored.read_bytes(), tmp_path / "back.onnx")
    model = onnx.load(str(back))
    assert not [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert not [n for n in model.graph.node if n.op_type == "Cast" and n.name.endswith("__cast")]
    m = json.loads((bundle_dir / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    feeds = {
        i.name: rng.normal(size=[d if isinstance(d, int) else 50 for d in i.shape]).astype(np.float32)
        for i in ort.InferenceSession(str(stored)).get_inputs()
        if i.name != "points"
    }
    feeds["points"] = np.stack([rng.integers(0, s, 50) for s in m["patch_size"]], 1).astype(np.int32)
    a, b = (ort.InferenceSession(str(p)).run(["logits"], feeds)[0] for p in (stored, back))
    np.testing.assert_array_equal(a, b)


def test_shared_difficulty_pairs_two_models_scan_by_scan(bundle_dir, unet_bundle_dir, phantom_dir, tmp_path):
    import subprocess
    import sys

    from shared_difficulty import summarise

    from imunet.export.calibration import spearman

    out = tmp_path / "report.json"
    cases = "phantom_001,phantom_002,phantom_003,phantom_004"
    script = Path(__file__).resolve().parents[1] / "tools" / "shared_difficulty.py"
    args = ["--model", bundle_dir, "--second", unet_bundle_dir, "--dataset", phantom_dir, "--cases", cases]
    subprocess.run([sys.executable, script, *map(str, args), "--exclude", "phantom_004", "--json", out], check=True)
    report = json.loads(out.read_text())
    assert list(report["per_scan"]) == ["phantom_001", "phantom_002", "phantom_003"]
    seg_a, seg_b = Segmenter(bundle_dir, backend="auto"), Segmenter(unet_bundle_dir, backend="auto")
    for case, row in report["per_scan"].items():
        image = phantom_dir / "imagesTr" / f"{case}_0000.nii.gz"
        ref = sitk.GetArrayFromImage(read_image(phantom_dir / "labelsTr" / f"{case}.nii.gz"))
        ra, rb = seg_a.segment(image), seg_b.segment(image)
        a, b = sitk.GetArrayFromImage(ra.labels), sitk.GetArrayFromImage(rb.labels)
        assert np.isclose(row["dice_a"], np.mean([dice(a, ref, k) for k in (1, 2)]), atol=1e-4)
        assert np.isclose(row["dice_b"], np.mean([dice(b, ref, k) for k in (1, 2)]), atol=1e-4)
        assert np.isclose(row["agreement"], np.mean([dice(a, b, k) for k in (1, 2)]), atol=1e-4)
    col = {k: np.array([r[k] for r in report["per_scan"].values()]) for k in ("dice_a", "dice_b", "agreement")}
    assert report["mean_agreement"] == round(float(col["agreement"].mean()), 4) < 1.0  # two different models
    assert np.isclose(report["shared"], spearman(col["dice_a"], col["dice_b"]), atol=1e-4, equal_nan=True)
    # one model against itself agrees everywhere: its agreement cannot rank anything
    same = summarise({c: {**r, "dice_b": r["dice_a"], "agreement": 1.0} for c, r in report["per_scan"].items()})
    assert same["mean_agreement"] == 1.0 and np.isnan(same["agreement_ranks_a"])
    from shared_difficulty import ranks

    assert ranks(np.array([0.3, 0.1, 0.3, 0.2])).tolist() == [2.5, 0.0, 2.5, 1.0]
