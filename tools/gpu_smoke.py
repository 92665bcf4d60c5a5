"""GPU smoke test: every GPU backend against onnxruntime on the CPU, on the shipped bundle.

Run it on any machine with an NVIDIA GPU, after ``pip install -e ".[gpu]"`` (about five minutes):

    python tools/gpu_smoke.py [--model BUNDLE] [--size 128 256 256] [--json gpu_smoke.json]

It copies the bundle to a temporary folder, builds fp32 and fp16 TensorRT engines there (strongly
typed networks from the bundle's fp32 and fp16 graphs), then for each backend and precision
(``tensorrt`` fp32/fp16, ``ort-trt`` and ``ort-cuda`` fp32/fp16) checks that the session got the
provider it asked for, compares its probabilities with onnxruntime CPU fp32 on the shipped sample
scan's window and on points that include the patch corners (where the positional encoding's
highest frequency matters), compares whole-scan labels, and times a CT-sized volume tiled from the
sample scan. One table; exit status 1 if anything failed or could not run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from harness import emit, machine

CASES = [("ort-cpu", "fp16"), ("tensorrt", "fp32"), ("tensorrt", "fp16"), ("ort-trt", "fp32"), ("ort-trt", "fp16"),
         ("ort-cuda", "fp32"), ("ort-cuda", "fp16")]  # fmt: skip
LIMITS = {"fp32": (1e-3, 0.999), "fp16": (2e-2, 0.995)}  # max |p| difference, argmax agreement


def build_engines(folder: Path, log: list[str]) -> None:
    """fp32 and fp16 engines into the bundle copy, recorded in its manifest."""
    from imunet.export.bundle import finalize_manifest
    from imunet.export.tensorrt import build_engines as build
    from imunet.export.tensorrt import with_engine
    from imunet.runtime.contract.bundle import load_bundle

    for precision in ("fp32", "fp16"):
        bundle = load_bundle(folder)
        try:
            record = build(bundle, precision, (1, 16384, bundle.manifest.max_points or 65536))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            log.append(f"engines {precision}: {type(exc).__name__}: {exc}")
            continue
        finalize_manifest(folder, with_engine(bundle.manifest, record))
        log.append(f"engines {precision}: built in {record.build}")


def probabilities(backend, bundle, patch: np.ndarray, points: np.ndarray) -> np.ndarray:
    from imunet.runtime.kernels.labels import softmax

    if bundle.manifest.kind.decodes_points:
        return softmax(backend.decode(backend.encode(patch), points))
    return softmax(backend.predict_dense(patch), axis=0).reshape(bundle.manifest.num_classes, -1).T


def check(kind: str, precision: str, folder: Path, scan: sitk.Image, big: sitk.Image, ref: dict) -> dict:
    from imunet.runtime import Segmenter

    t = time.perf_counter()
    seg = Segmenter(folder, backend=kind, precision=precision)
    open_s = time.perf_counter() - t
    p = probabilities(seg.backend, seg.bundle, ref["patch"], ref["points"])
    labels = sitk.GetArrayFromImage(seg.predict(scan))
    seg.predict(big)  # warm-up at this size
    t = time.perf_counter()
    seg.predict(big)
    diff, agree = float(np.abs(p - ref["p"]).max()), float((p.argmax(1) == ref["p"].argmax(1)).mean())
    row = {
        "backend": kind,
        "precision": seg.last_stats["precision"],
        "provider_checked": True,  # the backend refuses a session without the provider it asked for
        "max_abs_prob_diff": diff,
        "argmax_agreement": agree,
        "scan_label_agreement": float((labels == ref["labels"]).mean()),
        "open_s": round(open_s, 2),
        "ct_volume_s": round(time.perf_counter() - t, 3),
    }
    max_diff, min_agree = LIMITS[precision]
    row["ok"] = diff <= max_diff and agree >= min_agree and row["scan_label_agreement"] >= min_agree
    seg.close()
    return row


def print_table(rows: list[dict]) -> None:
    """One line per backend and precision, on stderr (the JSON report goes to stdout)."""

    def cell(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else format("-", ">" + fmt.split(".")[0].rstrip("ef"))

    head = f"{'backend':9s} {'precision':17s} {'max|dp|':>9s} {'argmax':>8s} {'labels':>8s} {'CT s':>8s}  result"
    print(head, file=sys.stderr)
    for r in rows:
        status = "ok" if r["ok"] else "FAILED: " + r.get("error", "outside the limits")
        print(
            f"{r['backend']:9s} {r['precision']:17s} {cell(r, 'max_abs_prob_diff', '9.2e')} "
            f"{cell(r, 'argmax_agreement', '8.4f')} {cell(r, 'scan_label_agreement', '8.4f')} "
            f"{cell(r, 'ct_volume_s', '8.3f')}  {status}",
            file=sys.stderr,
        )


def main() -> int:
    from imunet.runtime import Segmenter
    from imunet.runtime.contract.bundle import default_bundle_path
    from imunet.runtime.imaging.io import read_image
    from imunet.runtime.kernels.windows import pad_to_patch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_bundle_path())
    ap.add_argument("--size", type=int, nargs=3, default=(128, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    scan = read_image(
        Path(__file__).resolve().parents[1] / "runtime" / "default" / "sample" / "hippocampus_014_0000.nii.gz"
    )
    reps = [-(-s // n) for s, n in zip(args.size[::-1], scan.GetSize())]
    big = sitk.RegionOfInterest(sitk.Tile([scan] * int(np.prod(reps)), reps), args.size[::-1], [0, 0, 0])
    log: list[str] = []
    with tempfile.TemporaryDirectory(prefix="imunet-gpu-smoke-") as tmp:
        folder = Path(tmp) / args.model.name
        shutil.copytree(args.model, folder)
        build_engines(folder, log)
        cpu = Segmenter(folder, backend="ort-cpu", precision="fp32")
        m = cpu.bundle.manifest
        volume = sitk.GetArrayFromImage(scan).astype(np.float32)
        patch = pad_to_patch((volume - volume.mean()) / volume.std(), m.patch_size)[0][
            tuple(slice(0, p) for p in m.patch_size)
        ]
        from imunet.export.variants import sample_points

        points = sample_points(m.patch_size, 8192, np.random.default_rng(0))
        ref = {"patch": np.ascontiguousarray(patch), "points": points}
        ref["p"] = probabilities(cpu.backend, cpu.bundle, ref["patch"], points)
        ref["labels"] = sitk.GetArrayFromImage(cpu.predict(scan))
        t = time.perf_counter()
        cpu.predict(big)
        rows = [
            {
                "backend": "ort-cpu",
                "precision": "fp32 (reference)",
                "ct_volume_s": round(time.perf_counter() - t, 3),
                "ok": True,
            }
        ]
        for kind, precision in CASES:
            try:
                rows.append(check(kind, precision, folder, scan, big, ref))
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run is a row of the table
                rows.append(
                    {"backend": kind, "precision": precision, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
                )
    print_table(rows)
    emit(
        {"rows": rows, "engines": log, "volume_zyx": list(args.size), "limits": LIMITS, "machine": machine()}, args.json
    )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
