"""Inference settings: the user's and the bundle's options, validated; retired keys read with a note."""

import pytest

from imunet.runtime.contract.settings import InferenceSettings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "fast"}, "mode must be one of adaptive, sparse, dense, got 'fast'"),
        ({"overlap": 1.0}, r"overlap must be in \[0, 1\), got 1.0"),
        ({"stride": 0}, "stride must be >= 1, got 0"),
        ({"stride": 3}, "adaptive mode needs a power-of-two stride, got 3"),
        ({"band": -1}, "band must be >= 0, got -1"),
        ({"sigma_scale": 0}, "sigma_scale must be > 0, got 0"),
        ({"smoothing": 2}, "smoothing must be an odd kernel >= 1, got 2"),
    ],
)
def test_bad_values_are_refused_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InferenceSettings(**kwargs)


def test_sparse_mode_takes_any_stride():
    assert InferenceSettings(mode="sparse", stride=3).stride == 3


def test_unknown_keys_are_refused():
    assert InferenceSettings.from_dict({"mode": "sparse", "overlap": 0.25}) == InferenceSettings("sparse", 0.25)
    with pytest.raises(ValueError, match="unknown inference settings: halo"):
        InferenceSettings.from_dict({"mode": "sparse", "halo": 1})
    with pytest.raises(ValueError, match="unknown inference settings: speed"):
        InferenceSettings.from_dict({"speed": 3})


def test_round_trip():
    s = InferenceSettings(mode="dense", overlap=0.1, stride=2, band=1, sigma_scale=0.2, smoothing=5, tta=True)
    assert InferenceSettings.from_dict(s.to_dict()) == s
