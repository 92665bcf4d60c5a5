"""An int8 variant of the implicit decoder for onnxruntime on CPUs (dynamic quantisation).

The decoder is an MLP: nearly all of its time is matrix products (70% in the fp32 graph). With
weights stored as int8 and activations quantised per call, onnxruntime runs them as integer
products (VNNI on recent x86): about 2x faster per point on our CPUs. The encoder stays fp32
(convolutions gain little from dynamic quantisation). The variant is verified against the fp32
decoder on the fp32 encoder's features and its figures go into the manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np


def quantize_decoder(decoder: Path, out: Path) -> Path:
    """Write ``out``: ``decoder`` with int8 weights for every MatMul/Gemm (per output channel)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it advises pre-processing on the root logger; our graph is already optimised
    try:
        quantize_dynamic(
            str(decoder),
            str(out),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"],
        )
    finally:
        root.setLevel(level)
    return out


def int8_parity(
    encoder: Path,
    decoder: Path,
    decoder_int8: Path,
    patch_size: tuple[int, int, int],
    trials: int = 2,
    points: int = 4096,
    seed: int = 0,
) -> dict[str, Any]:
    """Largest |logit difference| and argmax agreement of the int8 decoder against the fp32 one."""
    import onnxruntime as ort

    def session(p: Path) -> Any:
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])

    enc, fp32, int8 = session(encoder), session(decoder), session(decoder_int8)
    names = [o.name for o in enc.get_outputs()]
    rng = np.random.default_rng(seed)
    worst, agree = 0.0, []
    for _ in range(trials):
        image = rng.normal(size=(1, 1, *patch_size)).astype(np.float32)
        feats = dict(zip(names, enc.run(names, {"image": image})))
        pts = np.stack([rng.integers(0, s, size=points) for s in patch_size], axis=1).astype(np.int32)
        a = fp32.run(["logits"], {**feats, "points": pts})[0]
        b = int8.run(["logits"], {**feats, "points": pts})[0]
        worst = max(worst, float(np.abs(a - b).max()))
        agree.append(float((a.argmax(1) == b.argmax(1)).mean()))
    return {
        "max_abs_logit_diff": worst,
        "argmax_agreement": min(agree),
        "trials": trials,
        "points": points,
        "inputs": "random normal patches, uniform random points",
    }
