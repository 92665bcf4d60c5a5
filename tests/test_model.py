"""The model: gather against brute force, gradients everywhere, export wrappers equal to the model."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from imunet.config import ModelConfig  # noqa: E402
from imunet.kinds import build_model  # noqa: E402
from imunet.model import count_parameters, gather_features, positional_encoding  # noqa: E402
from imunet.model.decoder import normalise_coordinates  # noqa: E402

from conftest import TINY_MODEL  # noqa: E402


def brute_force_gather(features, points, mode):
    b_, n_ = points.shape[:2]
    out = np.zeros((b_, n_, sum(f.shape[1] for f in features)), dtype=np.float32)
    for b in range(b_):
        for n in range(n_):
            row = []
            for level, f in enumerate(features):
                scale = 2**level
                idx = []
                for axis, p in enumerate(points[b, n].tolist()):
                    j = p // scale if mode == "floor" else (p + scale // 2) // scale
                    idx.append(min(j, f.shape[2 + axis] - 1))
                row.append(f[b, :, idx[0], idx[1], idx[2]].numpy())
            out[b, n] = np.concatenate(row)
    return out


@pytest.mark.parametrize("mode", ["floor", "nearest"])
def test_gather_equals_brute_force_loop(mode):
    torch.manual_seed(0)
    shapes = [(4, 16, 24, 8), (5, 8, 12, 4), (6, 4, 6, 2), (7, 2, 3, 1)]
    feats = [torch.randn(2, c, z, y, x) for c, z, y, x in shapes]
    pts = torch.stack([torch.randint(0, s, (2, 50)) for s in (16, 24, 8)], dim=-1)
    got = gather_features(feats, pts, mode).numpy()
    assert got.shape == (2, 50, 22)
    np.testing.assert_array_equal(got, brute_force_gather(feats, pts, mode))


def test_nearest_and_floor_differ_at_deep_levels():
    feats = [torch.arange(4.0).reshape(1, 1, 4, 1, 1)]
    pts = torch.tensor([[[1, 0, 0]]])
    # a single level-0 map: both modes pick voxel 1
    assert gather_features(feats, pts, "floor").item() == gather_features(feats, pts, "nearest").item() == 1.0
    deep = [torch.zeros(1, 1, 8, 1, 1), torch.arange(4.0).reshape(1, 1, 4, 1, 1)]
    pts = torch.tensor([[[3, 0, 0]]])  # 3 // 2 = 1 (floor) but nearest centre is 2*2 = 4 -> cell 2
    assert gather_features(deep, pts, "floor")[0, 0, 1].item() == 1.0
    assert gather_features(deep, pts, "nearest")[0, 0, 1].item() == 2.0


def test_positional_encoding_is_float32_and_matches_formula():
    coords = normalise_coordinates(torch.tensor([[0, 31, 16]]), (16, 32, 33))
    np.testing.assert_allclose(coords.numpy(), [[-1.0, 1.0, 0.0]], atol=1e-6)
    enc = positional_encoding(coords.half(), 10)
    assert enc.dtype == torch.float32 and enc.shape == (1, 60)
    # layout: [sin | cos], each coordinate-major (index c * L + l)
    assert enc[0, 1 * 10 + 9].item() == pytest.approx(np.sin(2**9 * np.pi * 1.0), abs=1e-3)
    assert enc[0, 30 + 0 * 10 + 0].item() == pytest.approx(np.cos(np.pi * -1.0), abs=1e-6)
    assert enc[0, 30 + 2 * 10 + 3].item() == pytest.approx(np.cos(2**3 * np.pi * 0.0), abs=1e-6)


@pytest.mark.parametrize("kind", ["implicit", "unet"])
def test_every_parameter_gets_a_gradient(kind):
    from imunet.losses import deep_supervision_loss, point_loss

    torch.manual_seed(0)
    cfg = ModelConfig(kind=kind, num_classes=3, **TINY_MODEL)
    model = build_model(cfg)
    img = torch.randn(2, 1, *cfg.patch_size)
    if kind == "implicit":
        pts = torch.stack([torch.randint(0, s, (2, 300)) for s in cfg.patch_size], dim=-1)
        loss = point_loss(model(img, pts), torch.randint(0, 3, (2, 300)))
    else:
        loss = deep_supervision_loss(model(img), torch.randint(0, 3, (2, *cfg.patch_size)))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_default_parameter_counts():
    imp = build_model(ModelConfig(kind="implicit", num_classes=3))  # the shipped recipe: 16..128, 8 x 256
    unet = build_model(ModelConfig(kind="unet", num_classes=3))
    assert count_parameters(imp.encoder) == 1_985_904
    assert count_parameters(unet.encoder) == count_parameters(imp.encoder)
    assert count_parameters(imp.decoder) == 617_219
    paper = ModelConfig(channels=(32, 64, 128, 256), decoder_width=512, num_classes=3)
    assert count_parameters(build_model(paper).encoder) == 7_939_296  # PAPER.md: about 7.94 M, blocks 2, 2, 4, 4
    assert 2.3e6 < count_parameters(build_model(paper).decoder) < 2.5e6  # 8 x 512 with the additive re-injection


def test_split_reinjection_is_the_same_function_and_drops_the_concat():
    from imunet.export.wrappers import SplitReinjectMLP, fold_weight_norm

    for reinject_at in (0, 1, 2):  # 0: no re-injection (nothing to split)
        torch.manual_seed(reinject_at)
        cfg = ModelConfig(kind="implicit", num_classes=3, **{**TINY_MODEL, "reinject_at": reinject_at})
        folded = fold_weight_norm(build_model(cfg).decoder)
        split = SplitReinjectMLP(folded)
        x = torch.randn(300, cfg.decoder_in)
        with torch.no_grad():
            assert float((split(x) - folded(x)).abs().max()) < 1e-5
        widths = [layer.in_features for layer in split.hidden]
        assert max(widths) <= max(cfg.decoder_width, cfg.decoder_in)  # no layer takes [h, x] any more
        assert (split.skip is not None) == (reinject_at > 0)


def test_export_wrapper_decoder_equals_model():
    from imunet.export.wrappers import DecoderExport, EncoderExport

    for gather in ("floor", "nearest"):
        torch.manual_seed(1)
        cfg = ModelConfig(kind="implicit", num_classes=3, gather=gather, **TINY_MODEL)
        model = build_model(cfg).eval()
        img = torch.randn(1, 1, *cfg.patch_size)
        pts = torch.stack([torch.randint(0, s, (500,)) for s in cfg.patch_size], dim=-1)
        with torch.no_grad():
            ref = model(img, pts[None])[0]
            feats = EncoderExport(model)(img)
            got = DecoderExport(model)(*feats, pts.to(torch.int32))
        assert float((ref - got).abs().max()) < 1e-5
        # folding the weight norm of the copy must leave the training model intact
        with torch.no_grad():
            again = model(img, pts[None])[0]
        assert torch.equal(ref, again)
