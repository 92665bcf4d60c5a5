"""Partially annotated datasets (an organ not contoured in a case is unknown there, not background)
and class-balanced sampling for small organs: the loss, the sampling, the dataset and validation."""

import json
import shutil

import numpy as np
import pytest

from imunet.sampling import class_locations, point_labels, sample_patch, sample_points

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from imunet.losses import deep_supervision_loss, dice_ce, point_loss  # noqa: E402


def test_with_every_class_known_the_loss_is_the_ordinary_one():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(500, 4, generator=g), torch.randint(0, 4, (500,), generator=g)
    assert float(dice_ce(logits, target, torch.ones(500, 4, dtype=torch.bool))) == pytest.approx(
        float(dice_ce(logits, target)), abs=1e-6
    )


def test_an_unannotated_organ_is_not_taught_to_be_background():
    """Background points inside an unannotated organ: the model saying "organ 2" there costs
    nothing under the marginal loss and a lot when absence is taken as background."""
    n = 400
    target = torch.zeros(n, dtype=torch.long)  # the reference says background (organ 2 was not contoured)
    logits = torch.full((n, 3), -8.0)
    logits[:, 2] = 8.0  # the model is sure it sees organ 2
    unknown2 = torch.tensor([True, True, False]).expand(n, 3)

    def push_on_organ2(known):
        x = logits.clone().requires_grad_(True)
        dice_ce(x, target, known).backward()
        return float(x.grad[:, 2].sum())  # > 0: gradient descent lowers the organ-2 logit

    assert push_on_organ2(unknown2) < 1e-4  # never pushed towards background
    assert push_on_organ2(None) > 0.5
    assert float(dice_ce(logits, target)) - float(dice_ce(logits, target, unknown2)) > 10
    # ... while an annotated organ that is absent still teaches background
    assert push_on_organ2(torch.ones(n, 3, dtype=torch.bool)) > 0.5
    assert float(F.cross_entropy(logits, target)) > 10


def test_point_and_deep_supervision_losses_take_per_case_annotations():
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(2, 50, 3, generator=g), torch.randint(0, 3, (2, 50), generator=g)
    known = torch.tensor([[True, True, True], [True, True, False]])
    rows = torch.cat([known[0].expand(50, 3), known[1].expand(50, 3)])
    assert float(point_loss(logits, target, known)) == pytest.approx(
        float(dice_ce(logits.reshape(-1, 3), target.reshape(-1), rows)), abs=1e-6
    )
    outs = [torch.randn(2, 3, 8, 8, 8, generator=g), torch.randn(2, 3, 4, 4, 4, generator=g)]
    lbl = torch.randint(0, 3, (2, 8, 8, 8), generator=g)
    full = float(deep_supervision_loss(outs, lbl))
    assert float(deep_supervision_loss(outs, lbl, torch.ones(2, 3, dtype=torch.bool))) == pytest.approx(full, abs=1e-6)
    assert float(deep_supervision_loss(outs, lbl, known)) != pytest.approx(full, abs=1e-4)


def two_organs(shape=(24, 48, 48)):
    """A large organ (label 1) and a thin one (label 2, 2 voxels across) in one label map."""
    lbl = np.zeros(shape, np.uint8)
    lbl[4:20, 8:40, 8:30] = 1
    lbl[2:22, 20:22, 36:38] = 2
    return lbl


def test_class_balanced_points_give_a_thin_organ_its_share():
    lbl = two_organs()
    for balanced, lo, hi in ((False, 0.0, 0.12), (True, 0.35, 0.65)):
        pts, from_b = sample_points(lbl, 20000, 1.0, 0.0, np.random.default_rng(0), balanced)
        near_thin = (point_labels(lbl, pts) == 2) | (np.abs(pts[:, 2] - 36.5) < 2) & (np.abs(pts[:, 1] - 20.5) < 2)
        assert lo < near_thin.mean() < hi, (balanced, near_thin.mean())
        assert from_b.all()


def test_class_balanced_patches_centre_each_class_equally():
    lbl = two_organs((40, 96, 96))
    img = np.zeros(lbl.shape, np.float32)
    rng = np.random.default_rng(0)
    locs = class_locations(lbl, [1, 2], rng)
    assert set(locs) == {1, 2} and len(locs[2]) == int((lbl == 2).sum())
    hits = {True: 0, False: 0}
    for balanced in (True, False):
        for _ in range(300):
            _, pl = sample_patch(img, lbl, (8, 8, 8), True, rng, locs if balanced else None)
            hits[balanced] += bool((pl[4, 4, 4] == 2))
    assert 0.4 < hits[True] / 300 < 0.6 and hits[False] / 300 < 0.05
    assert class_locations(lbl, [3], rng) == {}


@pytest.fixture(scope="module")
def partial_dir(tmp_path_factory):
    """The phantoms, with label 2 ('lesion') unannotated in two cases (and erased from their maps)."""
    import SimpleITK as sitk

    from make_phantoms import write_dataset

    root = write_dataset(tmp_path_factory.mktemp("partial"), cases=6, shape=(24, 40, 40), seed=3)
    annotated = {}
    for i in range(6):
        name = f"phantom_{i:03d}"
        annotated[name] = ["organ"] if i in (0, 5) else ["organ", "lesion"]
        if i in (0, 5):
            path = root / "labelsTr" / f"{name}.nii.gz"
            img = sitk.ReadImage(str(path))
            arr = sitk.GetArrayFromImage(img)
            arr[arr == 2] = 0
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(img)
            sitk.WriteImage(out, str(path), useCompression=True)
    (root / "annotated.json").write_text(json.dumps(annotated))
    return root


def test_the_dataset_reads_which_organs_each_case_annotated(partial_dir, tmp_path):
    from imunet.data import read_dataset
    from imunet.runtime.errors import InputError

    info = read_dataset(partial_dir)
    assert info.known("phantom_000").tolist() == [True, True, False]
    assert info.known("phantom_001").tolist() == [True, True, True]
    bad = shutil.copytree(partial_dir, tmp_path / "bad")
    (bad / "annotated.json").write_text(json.dumps({"phantom_000": ["organ", "tumour"]}))
    with pytest.raises(InputError, match="tumour"):
        read_dataset(bad)


@pytest.mark.parametrize("policy", ["marginal", "complete"])
def test_training_and_validation_on_partial_annotations(partial_dir, tmp_path, policy):
    """Validation scores a label only on the cases that annotated it; "complete" trains only on
    fully annotated cases."""
    from imunet.config import ModelConfig, RunConfig, TrainConfig
    from imunet.train import train

    from conftest import TINY_MODEL

    messages = []
    cfg = RunConfig(
        ModelConfig(kind="implicit", num_classes=3, **TINY_MODEL),
        TrainConfig(steps=3, batch_size=2, points=500, augment=False, val_fraction=0.34, seed=0,
                    partial_labels=policy),  # fmt: skip
    )
    metrics = train(partial_dir, tmp_path / policy, cfg, torch.device("cpu"), log=messages.append)
    split = json.loads((tmp_path / policy / "split.json").read_text())
    partial_val = [n for n in split["val"] if n in ("phantom_000", "phantom_005")]
    assert metrics["val_cases_per_label"] == {"1": len(split["val"]), "2": len(split["val"]) - len(partial_val)}
    for name in partial_val:
        assert "2" not in metrics["per_case"][name]
    used = next(m for m in messages if m.startswith("partial annotation"))
    partial_train = sum(n in ("phantom_000", "phantom_005") for n in split["train"])
    expected = len(split["train"]) - (partial_train if policy == "complete" else 0)
    assert used == f"partial annotation ({policy}): {expected} of {len(split['train'])} training cases used"
    assert metrics["peak_rss_mb"] > 50
