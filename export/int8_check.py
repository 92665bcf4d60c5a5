"""Whether a bundle's int8 decoder keeps the model's Dice on labelled cases it did not train on.

The exporter's parity check compares the int8 decoder with fp32 on random patches; what a user
gets is the labels of real scans. Here the run's validation cases (at most ``MAX_CASES``) are
segmented on the CPU twice, through ``imunet-run``'s defaults with the int8 decoder and with every
graph in fp32, and the mean Dice of the two is compared. A decoder that loses more than
``MAX_DICE_LOSS`` is taken out of the bundle, so ``auto`` runs fp32 on the CPU; one that keeps the
Dice carries the figures in its parity (``validation``). A hippocampus decoder with min-max
activation ranges lost 0.0116 (docs/DESIGN-NOTES.md, "The int8 decoder's activation ranges").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from imunet.runtime.contract.bundle import load_bundle

from .bundle import finalize_manifest
from .calibration import annotated_labels, observe

MAX_DICE_LOSS = 0.005  # mean Dice the int8 decoder may lose against fp32 and stay the CPU's default
MAX_CASES = 12  # validation cases segmented twice (a CT takes seconds each way)
VARIANT = "decoder_int8"


def mean_dice(bundle_dir: Path, precision: str, dataset: Path, cases: Sequence[str], scored: dict | None) -> float:
    """Mean Dice over each case's scored labels (as the Dice estimate's calibration scores them), the
    bundle run on onnxruntime's CPU at ``precision``; nan when no label is scored."""
    from imunet.runtime import Segmenter

    with Segmenter(bundle_dir, backend="ort-cpu", precision=precision) as seg:
        values = [o.dice for o in observe(seg, dataset, cases, scored)]
    return float(np.mean(values)) if values else float("nan")


def check_int8_decoder(
    bundle_dir: Path,
    dataset: Path,
    cases: Sequence[str],
    log: Callable[[str], None],
    max_loss: float = MAX_DICE_LOSS,
) -> dict | None:
    """Compare the bundle's int8 decoder with fp32 on ``cases`` of ``dataset``; keep it with the
    figures in its parity, or take it out of the bundle when it loses more than ``max_loss`` mean
    Dice. Returns the figures (None when the bundle has no int8 decoder or nothing to score it on)."""
    manifest = load_bundle(bundle_dir).manifest
    variant = manifest.variants.get(VARIANT)
    if variant is None or not cases:
        return None
    cases = list(cases)[:MAX_CASES]
    scored = annotated_labels(dataset)
    fp32 = mean_dice(bundle_dir, "fp32", dataset, cases, scored)
    int8 = mean_dice(bundle_dir, "int8", dataset, cases, scored)
    if np.isnan(fp32) or np.isnan(int8):
        log(f"note: the int8 decoder was not checked: no label is annotated in {len(cases)} validation cases")
        return None
    figures = {"cases": len(cases), "mean_dice": round(int8, 4), "fp32_mean_dice": round(fp32, 4)}
    variants = dict(manifest.variants)
    if fp32 - int8 > max_loss:
        del variants[VARIANT]
        (bundle_dir / variant.file).unlink()
        figures["kept"] = False
        log(
            f"note: the int8 decoder lost {fp32 - int8:.4f} mean Dice against fp32 on {len(cases)} validation "
            f"cases ({int8:.4f} against {fp32:.4f}): left out of the bundle; the CPU runs the fp32 decoder"
        )
    else:
        variants[VARIANT] = replace(variant, parity={**variant.parity, "validation": figures})
        figures["kept"] = True
        log(f"int8 decoder on {len(cases)} validation cases: mean Dice {int8:.4f} against fp32's {fp32:.4f}")
    finalize_manifest(bundle_dir, replace(manifest, variants=variants))
    return figures
