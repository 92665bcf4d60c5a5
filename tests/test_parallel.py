"""Several windows in flight: results in order, errors raised, and labels independent of the count."""

import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk
from test_inference import PATCH, index_volume, sphere_logits

from imunet.runtime.contract.settings import InferenceSettings
from imunet.runtime.kernels.inference import Loop, predict_probabilities
from imunet.runtime.kernels.parallel import default_workers, ordered_map, threads_per_worker

from conftest import FakeBackend


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_ordered_map_keeps_order_and_bounds_what_is_in_flight(workers):
    """The bound that keeps memory flat: items taken from the input but not yet yielded (windows cut
    and waiting, or computed and waiting their turn) never exceed ``workers * ahead``."""
    rng = np.random.default_rng(workers)
    delays = rng.uniform(0, 0.004, size=40)
    taken, given, most_pending, running, most_running = [0], [0], [0], [0], [0]
    lock = threading.Lock()

    def items():
        for i in range(40):
            taken[0] += 1
            most_pending[0] = max(most_pending[0], taken[0] - given[0])
            yield i

    def job(i):
        with lock:
            running[0] += 1
            most_running[0] = max(most_running[0], running[0])
        time.sleep(delays[i])
        with lock:
            running[0] -= 1
        return i * i

    out = []
    for value in ordered_map(job, items(), workers, ahead=2):
        given[0] += 1
        out.append(value)
    assert out == [i * i for i in range(40)]
    assert most_pending[0] <= max(1, workers * 2)
    if workers > 1:
        assert most_pending[0] == workers * 2  # it does read ahead that far ...
        assert most_running[0] > 1  # ... and calls overlap: the point of it


def test_ordered_map_raises_the_first_error_in_order():
    def job(i):
        if i == 5:
            raise RuntimeError("window 5 failed")
        return i

    seen = []
    with pytest.raises(RuntimeError, match="window 5 failed"):
        for r in ordered_map(job, range(20), 2):
            seen.append(r)
    assert seen == [0, 1, 2, 3, 4]


def test_default_workers_and_threads():
    assert default_workers("ort-cpu", cpus=2) == 2 and default_workers("ort-cpu", cpus=1) == 1
    assert default_workers("ort-cuda", cpus=16) == 1 and default_workers("tensorrt", cpus=16) == 1
    assert threads_per_worker(2, cpus=2) == 1 and threads_per_worker(2, cpus=16) == 8 and threads_per_worker(3, 2) == 1


@pytest.mark.parametrize(
    "settings",
    [
        InferenceSettings(mode="adaptive", smoothing=1),
        InferenceSettings(mode="sparse", smoothing=3),
        InferenceSettings(mode="dense", smoothing=1),
    ],
    ids=["adaptive", "sparse", "dense"],
)
def test_probabilities_and_counts_do_not_depend_on_workers(settings):
    shape = (40, 41, 37)
    volume = index_volume(shape)
    volume[:, :, 18:] = 7.0  # constant windows: reused, whichever thread computed the first
    fn = sphere_logits(shape, (10, 20, 9), (6, 8, 5))
    one, s1 = predict_probabilities(volume, Loop(FakeBackend(fn), PATCH, settings, workers=1))
    three, s3 = predict_probabilities(volume, Loop(FakeBackend(fn), PATCH, settings, workers=3))
    np.testing.assert_array_equal(one, three)
    assert (s1.windows, s1.points_decoded, s1.windows_reused) == (s3.windows, s3.points_decoded, s3.windows_reused)
    assert s1.windows_reused > 0 and s3.workers == 3


def test_segmenter_labels_are_the_same_on_one_or_two_workers(bundle_dir, unet_bundle_dir, phantom_dir):
    from imunet.runtime import Segmenter
    from imunet.runtime.imaging.io import read_image

    image = read_image(phantom_dir / "imagesTr" / "phantom_001_0000.nii.gz")
    big = sitk.Tile([image, image], [2, 1, 1])  # several windows
    for bundle in (bundle_dir, unet_bundle_dir):
        a = Segmenter(bundle, backend="ort-cpu", workers=1)
        b = Segmenter(bundle, backend="ort-cpu", workers=2)
        la, lb = sitk.GetArrayFromImage(a.predict(big)), sitk.GetArrayFromImage(b.predict(big))
        np.testing.assert_array_equal(la, lb)
        assert a.last_stats["workers"] == 1 and b.last_stats["workers"] == 2 and b.last_stats["windows"] > 1
    small = sitk.RegionOfInterest(image, [min(8, n) for n in image.GetSize()], [0, 0, 0])  # one window
    seg = Segmenter(bundle_dir, backend="ort-cpu", workers=2)
    one = sitk.GetArrayFromImage(seg.predict(small))
    assert seg.last_stats["windows"] == 1 and seg.last_stats["workers"] == 1  # every core on the one window
    np.testing.assert_array_equal(one, sitk.GetArrayFromImage(Segmenter(bundle_dir, workers=1).predict(small)))
    with pytest.raises(ValueError, match="workers must be >= 1"):
        Segmenter(bundle_dir, backend="ort-cpu", workers=0)


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino"])
def test_segmenter_keeps_to_the_cpus_it_was_given(bundle_dir, phantom_dir, backend):
    """A Ray actor granted one CPU computes on one thread, on one window at a time, whatever the node
    has; the labels are those of a segmenter on every core."""
    from imunet.runtime import Segmenter
    from imunet.runtime.imaging.io import read_image

    if backend == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    image = read_image(phantom_dir / "imagesTr" / "phantom_001_0000.nii.gz")
    big = sitk.Tile([image, image], [2, 1, 1])
    one = Segmenter(bundle_dir, backend=backend, cpus=1)
    labels = sitk.GetArrayFromImage(one.predict(big))
    assert one.workers == 1 and one.last_stats["workers"] == 1 and one.last_stats["windows"] > 1
    if backend == "ort-cpu":
        threads = {s.get_session_options().intra_op_num_threads for s in one.backend.sessions.values()}
    else:
        threads = {one.backend.compiled.get_property("INFERENCE_NUM_THREADS")}
        # a share of the cores floats over them; pinned, two such processes ran on the same core
        assert one.backend.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert threads == {1}
    every = Segmenter(bundle_dir, backend=backend)
    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(every.predict(big)))
    if backend == "openvino":  # a process on every core it may run on keeps its threads on their cores
        assert every.backend.compiled.get_property("ENABLE_CPU_PINNING") is True
    with pytest.raises(ValueError, match="cpus must be >= 1"):
        Segmenter(bundle_dir, backend=backend, cpus=0)
