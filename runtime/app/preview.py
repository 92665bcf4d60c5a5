"""A PNG for a person: axial, coronal and sagittal slices through the largest structure, as a
radiologist reads them (square pixels, patient's right on the viewer's left, head up), with
orientation letters, slice positions and a legend of label names and volumes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..contract.label_names import label_colour
from ..imaging.atomic import atomic_output

PALETTE = np.array([label_colour(k) for k in range(256)], dtype=np.float32)  # by label value (uint8)
MIN_PANEL = 256  # pixels: small scans are enlarged so that a person can see them
CAPTION = 20  # pixels above each panel for its name and slice
LINE = 20  # pixels per line of text (caption, legend)
TEXT, LETTER = 14, 18  # font sizes in pixels: text, orientation letters
GAP = 4  # pixels between views


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
    rgb = np.where((lab > 0)[..., None], 0.55 * rgb + 0.45 * PALETTE[lab], rgb)
    pixel = min(spacing_rc)
    rows = max(1, int(round(img.shape[0] * spacing_rc[0] / pixel)))
    cols = max(1, int(round(img.shape[1] * spacing_rc[1] / pixel)))
    ri = np.minimum((np.arange(rows) * pixel / spacing_rc[0]).astype(int), img.shape[0] - 1)
    ci = np.minimum((np.arange(cols) * pixel / spacing_rc[1]).astype(int), img.shape[1] - 1)
    return rgb[ri][:, ci].astype(np.uint8)


def _font(size: int):
    """Pillow's bundled scalable font at ``size`` pixels."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _tile(panel: np.ndarray, height: int, title: str, letters: str):
    """One view scaled to ``height`` pixels (square pixels kept), its orientation letters in white on a
    dark outline at the four edges, and its name and slice above it."""
    from PIL import Image, ImageDraw

    width = max(1, round(panel.shape[1] * height / panel.shape[0]))
    tile = Image.fromarray(panel).resize((width, height), Image.NEAREST)
    draw, font = ImageDraw.Draw(tile), _font(LETTER)
    left, right, top, bottom = letters
    for text, anchor, xy in ((left, "lm", (4, height // 2)), (right, "rm", (width - 4, height // 2)),
                             (top, "mt", (width // 2, 3)), (bottom, "mb", (width // 2, height - 3))):  # fmt: skip
        draw.text(xy, text, fill=(255, 255, 255), font=font, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))
    captioned = Image.new("RGB", (width, height + CAPTION), (0, 0, 0))
    captioned.paste(tile, (0, CAPTION))
    ImageDraw.Draw(captioned).text((4, 3), title, fill=(255, 255, 255), font=_font(TEXT))
    return captioned


def render(image: sitk.Image, label: sitk.Image, names: dict[int, str], caption: str = "") -> np.ndarray:
    """The preview as an RGB array ``(rows, cols, 3)``; ``caption`` (case, model, date) heads it."""
    from PIL import Image, ImageDraw

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
    height = max(MIN_PANEL, max(v[0].shape[0] for v in views))  # every view as tall: no band under any
    tiles = [_tile(panel, height, title, letters) for panel, title, letters in views]
    volumes = sitk.LabelShapeStatisticsImageFilter()
    volumes.Execute(sitk.Cast(label, sitk.sitkUInt8))
    entries = [(k, v) for k, v in names.items() if k]
    head = LINE if caption else 0
    width = sum(t.size[0] for t in tiles) + GAP * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, head + tiles[0].size[1] + LINE * max(1, len(entries)) + 8), (0, 0, 0))
    draw, font = ImageDraw.Draw(canvas), _font(TEXT)
    if caption:
        draw.text((4, 3), caption, fill=(255, 255, 255), font=font)
    xpos = 0
    for t in tiles:
        canvas.paste(t, (xpos, head))
        xpos += t.size[0] + GAP
    top = head + tiles[0].size[1] + 4
    for i, (k, name) in enumerate(entries):
        ml = volumes.GetPhysicalSize(k) / 1000.0 if volumes.HasLabel(k) else 0.0
        colour = label_colour(k)
        draw.rectangle((4, top + LINE * i + 2, 16, top + LINE * i + 14), fill=colour)
        draw.text((22, top + LINE * i), f"{name}: {ml:.2f} ml", fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def save_preview(canvas: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a :func:`render` picture to ``path`` as a PNG (not atomic by itself)."""
    sitk.WriteImage(sitk.GetImageFromArray(canvas, isVector=True), str(path), imageIO="PNGImageIO")
    return Path(path)


def write_preview(
    image: sitk.Image,
    label: sitk.Image,
    path: str | os.PathLike,
    names: dict[int, str],
    overwrite: bool = False,
    caption: str = "",
) -> Path:
    """Write :func:`render`'s picture as a PNG, atomically."""
    canvas = render(image, label, names, caption)
    with atomic_output(path, overwrite) as tmp:
        save_preview(canvas, tmp)
    return Path(path)
