"""The OpenVINO backend: convolutions on OpenVINO (fp32, bf16, static int8), the decoder on
onnxruntime, labels as onnxruntime's; every precision the runtime picks by itself checked on real scans."""

import numpy as np
import pytest
import SimpleITK as sitk

from imunet.runtime import Segmenter
from imunet.runtime.errors import BackendError

from conftest import HIPPO

ov = pytest.importorskip("openvino", reason="the openvino extra is not installed")


def has_bf16() -> bool:
    from imunet.runtime.backends.openvino import cpu_has_bf16

    return cpu_has_bf16(ov.Core())


def test_precision_choices():
    from imunet.runtime.backends.openvino import resolve_precision

    assert resolve_precision("auto", True, True) == "bf16" and resolve_precision("auto", False, True) == "fp32"
    assert resolve_precision("int8", False, True) == "int8"
    with pytest.raises(BackendError, match="no bf16 arithmetic"):
        resolve_precision("bf16", False, True)
    with pytest.raises(BackendError, match="no int8 encoder graph for OpenVINO"):
        resolve_precision("int8", True, False)
    with pytest.raises(BackendError, match="not 'fp16'"):
        resolve_precision("fp16", True, True)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_labels_match_onnxruntime_on_phantoms(bundle_dir, unet_bundle_dir, phantom_dir, precision):
    if precision == "bf16" and not has_bf16():
        pytest.skip("this CPU has no bf16 arithmetic")
    image = sitk.ReadImage(str(phantom_dir / "imagesTr" / "phantom_003_0000.nii.gz"))
    for b in (bundle_dir, unet_bundle_dir):
        ref = sitk.GetArrayFromImage(Segmenter(b, backend="ort-cpu", precision="fp32").predict(image))
        seg = Segmenter(b, backend="openvino", precision=precision)
        got = sitk.GetArrayFromImage(seg.predict(image))
        assert seg.backend.precision.startswith(f"openvino {precision}") and seg.workers == 2
        assert (got == ref).mean() >= (0.9999 if precision == "fp32" else 0.995)


def test_the_decoder_and_its_encoding_never_run_in_openvino(bundle_dir):
    seg = Segmenter(bundle_dir, backend="openvino")
    ops = {op.get_type_name() for op in seg.backend.compiled.get_runtime_model().get_ops()}
    assert "Sin" not in ops and "Cos" not in ops and "Gather" not in ops  # only the encoder is compiled there
    assert seg.backend.decoder.name == "ort-cpu" and set(seg.backend.decoder.sessions) == {"decoder"}


@pytest.mark.skipif(not HIPPO.is_dir(), reason="shared hippocampus data not present")
def test_every_precision_auto_picks_keeps_the_labels_on_real_scans():
    import json

    from imunet.runtime.imaging.metrics import dice

    from conftest import ROOT

    cases = json.loads((ROOT / "docs" / "results" / "hippocampus_split.json").read_text())["val"][:4]
    reference = Segmenter(backend="ort-cpu", precision="fp32")
    candidates = [Segmenter(backend="ort-cpu"), Segmenter(backend="openvino")]
    if has_bf16():
        candidates.append(Segmenter(backend="openvino", precision="int8"))
    for c in cases:
        image = sitk.ReadImage(str(HIPPO / "imagesTr" / f"{c}_0000.nii.gz"))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPO / "labelsTr" / f"{c}.nii.gz")))
        ref = sitk.GetArrayFromImage(reference.predict(image))
        for seg in candidates:
            got = sitk.GetArrayFromImage(seg.predict(image))
            assert (got == ref).mean() >= 0.999, seg.backend.precision
            assert abs(np.mean([dice(got, truth, k) - dice(ref, truth, k) for k in (1, 2)])) <= 0.01


def test_auto_prefers_openvino_where_it_is_installed(bundle_dir):
    assert Segmenter(bundle_dir).backend.name == "openvino"


def test_two_workers_get_a_stream_each_and_the_same_labels(bundle_dir, phantom_dir):
    image = sitk.ReadImage(str(phantom_dir / "imagesTr" / "phantom_003_0000.nii.gz"))
    image = sitk.Tile([image] * 4, [2, 2, 1])  # several windows: the two-worker pool runs them
    one, p_one = Segmenter(bundle_dir, backend="openvino", precision="fp32", workers=1).predict_with_probabilities(
        image
    )
    seg = Segmenter(bundle_dir, backend="openvino", precision="fp32", workers=2)
    two, p_two = seg.predict_with_probabilities(image)
    assert seg.last_stats["workers"] == 2 and seg.last_stats["windows"] > 1
    # one stream per worker: workers sharing one stream wait for each other (docs/DESIGN-NOTES.md)
    assert int(seg._pool_backend.compiled.get_property("NUM_STREAMS")) == 2
    assert int(seg.backend.compiled.get_property("NUM_STREAMS")) == 1
    # a stream of one thread sums in another order than one of two: the same up to float rounding,
    # so labels may differ only where two classes tie within it
    assert np.abs(p_one - p_two).max() < 1e-3
    one, two = sitk.GetArrayFromImage(one), sitk.GetArrayFromImage(two)
    top2 = np.sort(p_one, axis=0)[-2:]
    assert ((one == two) | (top2[1] - top2[0] < 2e-3)).all()


FIRST_CALLS = """
import threading, numpy as np
from imunet.runtime.backends.openvino import OpenVinoBackend
from imunet.runtime.contract.bundle import load_bundle
n = 8
backend = OpenVinoBackend(load_bundle({bundle!r}), precision="fp32", threads=1, streams=n)
start = threading.Barrier(n)
def work():
    start.wait()  # every thread makes its first call at the same moment
    backend.encode(np.zeros(backend.manifest.patch_size, np.float32))
threads = [threading.Thread(target=work) for _ in range(n)]
[t.start() for t in threads]
[t.join() for t in threads]
"""


def test_threads_starting_together_do_not_deadlock_in_openvino_bindings():
    """OpenVINO's bindings set up numpy on first use behind a static guard; eight threads arriving
    together hung 3 of 20 fresh processes before the backend made its first call while opening."""
    import subprocess
    import sys

    from conftest import ROOT

    script = FIRST_CALLS.format(bundle=str(ROOT / "runtime" / "default" / "hippocampus.imunet"))
    for _ in range(6):  # fresh processes: the guard is set up once per process
        done = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
