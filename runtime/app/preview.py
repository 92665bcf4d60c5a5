"""A PNG for a person: axial, coronal and sagittal slices through the largest structure, as a
radiologist reads them (square pixels, patient's right on the viewer's left, head up), with
orientation letters, slice positions and a legend of label names and volumes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..imaging.atomic import atomic_output

PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60]],
    dtype=np.float32,
)  # fmt: skip
MIN_PANEL = 256  # pixels: small scans are enlarged so that a person can see them
CAPTION = 14  # pixels above each panel for its name and slice


def _centre(lab: np.ndarray) -> tuple[int, int, int]:
    """The centroid of the largest labelled structure (its largest connected component), else the middle."""
    if not lab.any():
        return tuple(s // 2 for s in lab.shape)  # type: ignore[return-value]
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray((lab > 0).astype(np.uint8))))
    z, y, x = np.argwhere(sitk.GetArrayViewFromImage(cc) == 1).mean(0)
    return int(round(z)), int(round(y)), int(round(x))


def _panel(
    img: np.ndarray, lab: np.ndarray, spacing_rc: tuple[float, float], window: tuple[float, float]
) -> np.ndarray:
    """An RGB panel of one slice with square pixels: labels blended over the grey image."""
    lo, hi = window
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb = np.where((lab > 0)[..., None], 0.55 * rgb + 0.45 * PALETTE[lab % len(PALETTE)], rgb)
    pixel = min(spacing_rc)
    rows = max(1, int(round(img.shape[0] * spacing_rc[0] / pixel)))
    cols = max(1, int(round(img.shape[1] * spacing_rc[1] / pixel)))
    ri = np.minimum((np.arange(rows) * pixel / spacing_rc[0]).astype(int), img.shape[0] - 1)
    ci = np.minimum((np.arange(cols) * pixel / spacing_rc[1]).astype(int), img.shape[1] - 1)
    return rgb[ri][:, ci].astype(np.uint8)


def render(image: sitk.Image, label: sitk.Image, names: dict[int, str]) -> np.ndarray:
    """The preview as an RGB array ``(rows, cols, 3)``."""
    from PIL import Image, ImageDraw, ImageFont

    img_lps, lab_lps = sitk.DICOMOrient(image, "LPS"), sitk.DICOMOrient(label, "LPS")
    img = sitk.GetArrayFromImage(img_lps).astype(np.float32)  # (z: I->S, y: A->P, x: R->L)
    lab = sitk.GetArrayFromImage(lab_lps).astype(np.int64)
    sx, sy, sz = img_lps.GetSpacing()
    z, y, x = _centre(lab)
    window = tuple(np.percentile(img, [1, 99]))
    views = [  # (panel, title, letters: left, right, top, bottom)
        (_panel(img[z], lab[z], (sy, sx), window), f"axial {z + 1}/{img.shape[0]}", "RLAP"),
        (_panel(img[::-1, y], lab[::-1, y], (sz, sx), window), f"coronal {y + 1}/{img.shape[1]}", "RLSI"),
        (_panel(img[::-1, :, x], lab[::-1, :, x], (sz, sy), window), f"sagittal {x + 1}/{img.shape[2]}", "APSI"),
    ]
    zoom = max(1, MIN_PANEL // max(v[0].shape[0] for v in views))
    font = ImageFont.load_default()
    tiles = []
    for panel, title, (left, right, top, bottom) in views:
        tile = Image.fromarray(panel).resize((panel.shape[1] * zoom, panel.shape[0] * zoom), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        w, h = tile.size
        for text, (px, py) in ((left, (3, h // 2 - 5)), (right, (w - 10, h // 2 - 5)), (top, (w // 2 - 3, 2)),
                               (bottom, (w // 2 - 3, h - 13))):  # fmt: skip
            draw.text((px, py), text, fill=(255, 255, 0), font=font)
        captioned = Image.new("RGB", (w, h + CAPTION), (0, 0, 0))
        captioned.paste(tile, (0, CAPTION))
        ImageDraw.Draw(captioned).text((3, 2), title, fill=(255, 255, 255), font=font)
        tiles.append(captioned)
    volumes = sitk.LabelShapeStatisticsImageFilter()
    volumes.Execute(sitk.Cast(label, sitk.sitkUInt8))
    legend_h = 16 * max(1, len(names) - 1) + 8
    width = sum(t.size[0] for t in tiles) + 4 * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, max(t.size[1] for t in tiles) + legend_h), (0, 0, 0))
    xpos = 0
    for t in tiles:
        canvas.paste(t, (xpos, 0))
        xpos += t.size[0] + 4
    draw = ImageDraw.Draw(canvas)
    top = max(t.size[1] for t in tiles) + 4
    for i, (k, name) in enumerate((k, v) for k, v in names.items() if k):
        ml = volumes.GetPhysicalSize(k) / 1000.0 if volumes.HasLabel(k) else 0.0
        colour = tuple(int(c) for c in PALETTE[k % len(PALETTE)])
        draw.rectangle((4, top + 16 * i, 14, top + 16 * i + 10), fill=colour)
        draw.text((20, top + 16 * i), f"{name}: {ml:.2f} ml", fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def write_preview(
    image: sitk.Image, label: sitk.Image, path: str | os.PathLike, names: dict[int, str], overwrite: bool = False
) -> Path:
    """Write :func:`render`'s picture as a PNG, atomically."""
    canvas = render(image, label, names)
    with atomic_output(path, overwrite) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(canvas, isVector=True), str(tmp))
    return Path(path)
