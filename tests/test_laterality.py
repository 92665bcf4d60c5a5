"""Left and right: paired organs are found by name, training flips swap them, and test-time mirroring
puts their probabilities back on their own sides."""

import numpy as np
import pytest
import torch

from imunet.augment import AugmentConfig, LeftRight, augment_batch
from imunet.runtime.contract.laterality import lateral_axis, lateral_pairs, swap_permutation
from imunet.runtime.kernels.mirroring import MirroredBackend

HEADNECK = {0: "background", 1: "Brainstem", 2: "SpinalCord", 3: "RightParotid", 4: "LeftParotid",
            5: "Esophagus", 6: "Larynx", 7: "Mandible"}  # fmt: skip


@pytest.mark.parametrize(
    "labels, pairs",
    [
        (HEADNECK, ((4, 3),)),
        ({0: "bg", 1: "Parotid_L", 2: "Parotid_R", 3: "Lung_L", 4: "Lung_R", 5: "Larynx"}, ((1, 2), (3, 4))),
        ({0: "bg", 1: "kidney right", 2: "kidney left"}, ((2, 1),)),
        ({0: "bg", 1: "anterior", 2: "posterior"}, ()),  # the hippocampus: no sides
        ({0: "bg", 1: "Lens_L", 2: "Lens_L", 3: "Lens_R"}, ()),  # ambiguous: two left lenses pair with nothing
        ({0: "bg", 1: "Left", 2: "Right"}, ()),  # a side word alone names no organ
    ],
)
def test_pairs_are_found_by_name(labels, pairs):
    assert lateral_pairs(labels) == pairs


def test_the_lateral_axis_follows_the_orientation_code():
    assert [lateral_axis(c) for c in ("LPS", "RAS", "PIL", "ILP", None)] == [2, 2, 0, 1, None]
    assert swap_permutation(5, ((1, 2),)) == (0, 2, 1, 3, 4)


def test_a_left_right_flip_keeps_each_side_its_own_label():
    label = torch.zeros(3, 4, 5, 10, dtype=torch.long)
    label[..., :3], label[..., 7:] = 1, 2  # label 1 always on the low-x side, 2 on the high-x side
    image = (label == 1).float()[:, None]
    known = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    only_flips = AugmentConfig(p_spatial=0, p_flip=1.0, p_noise=0, p_contrast=0)
    gen = torch.Generator().manual_seed(0)
    img, lbl, kn = augment_batch(image, label, gen, only_flips, known, LeftRight(2, (0, 2, 1)))
    assert torch.equal(lbl[..., :3], torch.ones_like(lbl[..., :3]))  # mirrored, then swapped back by name
    assert torch.equal(lbl[..., 7:], torch.full_like(lbl[..., 7:], 2))
    assert torch.equal(img[:, 0], (lbl == 2).float())  # the image itself did mirror
    assert kn.tolist() == [[True, False, True], [True, True, False], [True, True, True]]  # annotation follows
    _, plain, _ = augment_batch(image, label, torch.Generator().manual_seed(0), only_flips, known)
    assert torch.equal(plain[..., :3], torch.full_like(plain[..., :3], 2))  # without pairs: a plain mirror


class SidedModel:
    """A dense 'model' that answers class 1 on the low-x half and class 2 on the high-x half, as a
    model that knows left from right does."""

    name, max_points, features_reusable, precision, skipped = "sided", 0, False, "fp32", 0

    def predict_dense(self, patch):
        logits = np.zeros((3, *patch.shape), np.float32)
        half = patch.shape[2] // 2
        logits[1, :, :, :half] = logits[2, :, :, half:] = 5.0
        return logits

    def close(self):
        pass


def test_test_time_mirroring_swaps_pairs_back():
    patch = np.zeros((4, 4, 8), np.float32)
    swapped = MirroredBackend(SidedModel(), (0, 1, 2), (4, 4, 8), lateral=2, swap=(0, 2, 1))
    plain = MirroredBackend(SidedModel(), (0, 1, 2), (4, 4, 8))
    assert (swapped.predict_dense(patch).argmax(0)[:, :, :4] == 1).all()
    assert (swapped.predict_dense(patch).argmax(0)[:, :, 4:] == 2).all()
    blurred = np.exp(plain.predict_dense(patch))  # without the swap the sides average to a coin toss
    assert np.allclose(blurred[1], blurred[2], atol=1e-3)
