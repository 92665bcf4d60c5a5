"""The label map from class probabilities: smooth (``kernel``^3 box average), then argmax. Pure numpy.

Smoothing can only change a voxel's label where its ``kernel``^3 neighbourhood holds more than one
unsmoothed label: where all neighbours' probabilities peak at class ``c``, so does their average
(and, float rounding being monotonic, so does their float sum). So the argmax is taken once, the
neighbourhoods that hold more than one label are found with a min and a max filter on the labels,
and only there are the neighbours' probabilities summed. The result equals
``box_smooth(probs).argmax(0)`` except where two classes' smoothed values tie to the last bit. It
takes about as long as smoothing every class map but never holds a smoothed float copy: the
boundary voxels are a few percent of a scan (0.10 against 0.64 GiB added to the peak at
200x512x512, docs/DESIGN-NOTES.md).
"""

from __future__ import annotations

import numpy as np

from .mesh import box_filter


def class_weights(offsets: tuple[float, ...], classes: int) -> np.ndarray | None:
    """``exp(offsets)`` as float32 (None without offsets): what each class's probability is scaled by
    when the label is chosen (``InferenceSettings.logit_offsets``)."""
    if not offsets:
        return None
    if len(offsets) != classes:
        raise ValueError(f"logit_offsets needs {classes} values (one per class), got {len(offsets)}")
    return np.exp(np.asarray(offsets, dtype=np.float64)).astype(np.float32)


def choose_labels(probs: np.ndarray, offsets: tuple[float, ...] = ()) -> np.ndarray:
    """Labels ``uint8`` of class probabilities ``(C, ...)``: the argmax of ``log p + offsets``."""
    scale = class_weights(offsets, probs.shape[0])
    if scale is None:
        return probs.argmax(0).astype(np.uint8)
    return (probs * scale.reshape(-1, *([1] * (probs.ndim - 1)))).argmax(0).astype(np.uint8)


def smoothed_argmax(
    acc: np.ndarray,
    weights: np.ndarray | None,
    crop: tuple[slice, slice, slice],
    kernel: int = 3,
    offsets: tuple[float, ...] = (),
) -> np.ndarray:
    """Labels ``uint8`` of the ``crop`` of class maps ``acc`` ``(C, Z, Y, X)`` (divided by ``weights``
    ``(Z, Y, X)`` where given), averaged over a ``kernel``^3 box that is clipped at the crop's border
    (``box_smooth``), argmax of ``log p + offsets`` with ties to the lower class. The scaling
    ``exp(offsets)`` is the same for every voxel, so it commutes with the average. ``acc`` and
    ``weights`` are not changed."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"smoothing kernel must be odd and >= 1, got {kernel}")
    if acc.shape[0] > 255:
        raise ValueError(f"at most 255 classes fit a uint8 label map, got {acc.shape[0]}")
    best: np.ndarray | None = None
    labels = np.zeros(tuple(s.stop - s.start for s in crop), dtype=np.uint8)
    w = weights[crop] if weights is not None else None
    scale = class_weights(offsets, acc.shape[0])
    for c in range(acc.shape[0]):
        p = acc[c][crop] / w if w is not None else acc[c][crop]
        if scale is not None:
            p = p * scale[c]
        if best is None:
            best = np.array(p, dtype=np.float32, copy=True)
        else:
            better = p > best  # strict: ties keep the lower class, as argmax does
            labels[better] = c
            np.maximum(best, p, out=best)
        del p
    del best
    r = kernel // 2
    if r == 0:
        return labels
    mixed = box_filter(labels, r, np.minimum) != box_filter(labels, r, np.maximum)
    centre = np.nonzero(mixed)
    del mixed
    if len(centre[0]) == 0:
        return labels
    labels[centre] = _neighbourhood_argmax(acc, weights, crop, centre, r, scale)
    return labels


def _neighbourhood_argmax(
    acc: np.ndarray,
    weights: np.ndarray | None,
    crop: tuple[slice, slice, slice],
    centre: tuple[np.ndarray, np.ndarray, np.ndarray],
    r: int,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """Argmax of the ``(2r + 1)``^3 neighbourhood sums (inside the crop) of the class maps at the
    ``centre`` voxels (crop indices). The box's voxel count is the same for every class, so the sums
    rank the classes as the averages do."""
    shape = tuple(s.stop - s.start for s in crop)
    start = np.array([s.start for s in crop])
    full = acc.shape[1:]
    flat = np.ravel_multi_index(tuple(c + o for c, o in zip(centre, start)), full)
    strides = (full[1] * full[2], full[2], 1)
    n_classes = acc.shape[0]
    maps = acc.reshape(n_classes, -1)
    wflat = weights.reshape(-1) if weights is not None else None
    # per axis and shift: is the neighbour inside the crop (None where it always is)
    valid_axis = []
    for axis in range(3):
        per_shift = {}
        for d in range(-r, r + 1):
            inside = (centre[axis] + d >= 0) & (centre[axis] + d < shape[axis])
            per_shift[d] = None if inside.all() else inside
        valid_axis.append(per_shift)
    sums = np.zeros((n_classes, len(flat)), dtype=np.float32)
    for dz in range(-r, r + 1):
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                masks = [m for m in (valid_axis[0][dz], valid_axis[1][dy], valid_axis[2][dx]) if m is not None]
                index = flat + (dz * strides[0] + dy * strides[1] + dx * strides[2])
                keep = None
                if masks:
                    keep = masks[0] if len(masks) == 1 else np.logical_and.reduce(masks)
                    index = np.where(keep, index, flat)  # stay in bounds; zeroed below
                div = wflat.take(index) if wflat is not None else None
                for c in range(n_classes):
                    v = maps[c].take(index)
                    if div is not None:
                        v /= div
                    if keep is not None:
                        v *= keep
                    sums[c] += v
    if scale is not None:
        sums *= scale[:, None]
    out = np.zeros(len(flat), dtype=np.uint8)
    best = sums[0]
    for c in range(1, n_classes):
        better = sums[c] > best
        out[better] = c
        best = np.maximum(best, sums[c])
    return out


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32."""
    z = logits.astype(np.float32, copy=False)
    z = z - z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z
