"""Whole-volume segmentation time and accuracy of several configurations side by side, each in a
fresh process, on the same volume: runtime bundles with any options, and a U-Net training run
through MONAI's ``sliding_window_inference`` in PyTorch (what a user would pick instead).

    python tools/bench_segment.py --size 64 256 256 --repeats 3 \\
        --config implicit=runtime/default/hippocampus.imunet \\
        --config implicit-fp32=runtime/default/hippocampus.imunet:precision=fp32,mode=sparse \\
        --config unet=runs/unet.imunet --config monai=runs/unet:autocast=bf16 \\
        --baseline unet --reference implicit --json docs/results/segment_64x256x256.json

A configuration is ``NAME=PATH[:KEY=VALUE,...]``. A bundle folder runs through ``Segmenter`` with
the options as its keyword arguments (``mode``, ``precision``, ``overlap``, ``workers``, ``backend``,
``tta``, ...); a training run folder (``checkpoint.pt``) runs the PyTorch model through MONAI with
overlap 0.3 and Gaussian blending (sigma 0.125 of the patch), optionally under ``autocast=bf16``.
The volume is packed from held-out hippocampus crops (``tools/volumes.py``; ``--size``), or is the
first ``--scans N`` held-out scans, one at a time. Configurations run in turn within each repeat,
so drift hits all alike; each prediction follows one warm-up call. Reported per configuration:
median seconds (per volume, or per scan), peak resident memory, points decoded per voxel, windows,
encoder and decoder seconds, mean Dice against the truth, agreement with ``--reference``'s labels
(over all voxels, and per scan over the voxels either labels as foreground), and time ratios against ``--baseline``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from harness import DATA, SPLIT, case_names, emit, fresh_process, machine, median, peak_rss_gib


def parse_config(text: str) -> tuple[str, Path, dict]:
    """``NAME=PATH[:KEY=VALUE,...]`` -> (name, path, options); values are JSON where they parse."""
    name, _, rest = text.partition("=")
    path, _, opts = rest.partition(":")
    options = {}
    for kv in filter(None, opts.split(",")):
        k, _, v = kv.partition("=")
        try:
            options[k] = json.loads(v)
        except ValueError:
            options[k] = v
    if not name or not path:
        raise SystemExit(f"--config {text!r}: expected NAME=PATH[:KEY=VALUE,...]")
    return name, Path(path), options


def monai_segmenter(run: Path, options: dict):
    """A function from a scan to labels: the run's PyTorch model through MONAI's sliding window."""
    import torch
    from monai.inferers import sliding_window_inference

    from imunet.export.bundle import load_run
    from imunet.runtime.imaging.preprocess import Normalization, normalize

    cfg, stats, model = load_run(run)
    if cfg.model.kind != "unet":
        raise SystemExit(f"{run}: MONAI's sliding window runs dense models; this run is {cfg.model.kind}")
    norm = Normalization.from_dict(stats["normalization"])
    bf16 = options.get("autocast") == "bf16"

    def segment(image: sitk.Image) -> np.ndarray:
        x = torch.from_numpy(normalize(sitk.GetArrayViewFromImage(image), norm))[None, None]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = sliding_window_inference(x, cfg.model.patch_size, 1, model, 0.3, "gaussian", 0.125)
        return logits[0].float().argmax(0).to(torch.uint8).numpy()

    return segment, {}


def runtime_segmenter(bundle: Path, options: dict):
    from imunet.runtime import Segmenter

    seg = Segmenter(bundle, **{"backend": "ort-cpu", **options})
    return (lambda image: sitk.GetArrayFromImage(seg.predict(image))), seg


def child(path: str, options: str, inputs: str, out: str) -> None:
    """One configuration in this process: warm up, time every input, save the labels, print JSON."""
    opts = json.loads(options)
    run = Path(path)
    segment, seg = (monai_segmenter if (run / "checkpoint.pt").exists() else runtime_segmenter)(run, opts)
    images = [sitk.ReadImage(p) for p in json.loads(inputs)]
    segment(images[0])  # warm-up: sessions, allocator, caches
    walls, labels, stats = [], {}, []
    for i, image in enumerate(images):
        t = time.perf_counter()
        labels[str(i)] = segment(image)
        walls.append(time.perf_counter() - t)
        stats.append(seg.last_stats if seg is not None else {})
    np.savez_compressed(out, **labels)
    keys = (
        "points_per_voxel",
        "windows",
        "windows_reused",
        "features_reused",
        "encode_s",
        "decode_s",
        "workers",
        "precision",
        "backend",
    )
    summary = {k: stats[-1][k] for k in keys if k in stats[-1]}
    print(json.dumps({"wall_s": median(walls), "peak_rss_gib": peak_rss_gib(), **summary}))


def annotated_classes(data: Path, cases: list[str]) -> list[set[int] | None]:
    """Per case, the label values its contours cover (``annotated.json`` of a partially annotated
    dataset); None where every label is annotated."""
    from imunet.export.calibration import annotated_labels

    annotated = annotated_labels(data)
    if annotated is None:
        return [None] * len(cases)
    codes = json.loads((data / "dataset.json").read_text())["labels"]
    return [{int(codes[n]) for n in annotated.get(c, [])} for c in cases]


def volumes(args: argparse.Namespace, work: Path) -> tuple[list[str], list[np.ndarray], list[set[int] | None]]:
    """Input files for the children, their true labels and the labels each case annotated (None: all)."""
    if args.scans:
        data = args.data or DATA
        cases = case_names(args.cases or f"@{SPLIT}:val")[: args.scans]
        inputs = [str(data / "imagesTr" / f"{c}_0000.nii.gz") for c in cases]
        truth = [sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / f"{c}.nii.gz"))) for c in cases]
        if args.resample:  # as another scanner would store it: linear image, nearest labels
            from imunet.runtime.imaging.preprocess import resample_label_like, resample_to_spacing

            for i, c in enumerate(cases):
                image = resample_to_spacing(sitk.ReadImage(inputs[i]), tuple(args.resample))
                label = resample_label_like(sitk.ReadImage(str(data / "labelsTr" / f"{c}.nii.gz")), image)
                inputs[i] = str(work / f"{c}_resampled.nii.gz")
                sitk.WriteImage(image, inputs[i])
                truth[i] = sitk.GetArrayFromImage(label)
        return inputs, truth, annotated_classes(data, cases)
    from volumes import held_out_volume

    image, label = held_out_volume(tuple(args.content or args.size), args.phantom_seed)
    if args.content:  # the packed crops in the centre, air (a constant) around them
        frame = np.zeros(args.size, np.float32)
        framed = np.zeros(args.size, np.uint8)
        box = tuple(slice((n - c) // 2, (n - c) // 2 + c) for n, c in zip(args.size, args.content))
        frame[box], framed[box] = sitk.GetArrayFromImage(image), label
        image, label = sitk.GetImageFromArray(frame), framed
    sitk.WriteImage(image, str(work / "volume.nii"))
    return [str(work / "volume.nii")], [label], [None]


def describe_volumes(args: argparse.Namespace, count: int) -> str:
    if not args.scans:
        return f"{args.size} packed, seed {args.phantom_seed}"
    resampled = f" resampled to {args.resample} mm" if args.resample else ""
    return f"{count} held-out scans of {args.data or DATA}{resampled}"


def score(
    labels: list[np.ndarray],
    truth: list[np.ndarray],
    reference: list[np.ndarray] | None,
    scored: list[set[int] | None] | None = None,
) -> dict:
    """Mean Dice over each case's labels (only those it annotated, where ``scored`` says), and the
    agreement with ``reference``'s labels."""
    from imunet.runtime.imaging.metrics import dice

    classes = sorted(int(c) for c in np.unique(np.concatenate([t.ravel() for t in truth])) if c)
    scored = scored or [None] * len(truth)
    values = [dice(p, t, c) for p, t, s in zip(labels, truth, scored) for c in classes if s is None or c in s]
    out = {"mean_dice": round(float(np.mean(values)), 4)}
    if reference is not None:
        same = sum(int((p == r).sum()) for p, r in zip(labels, reference))
        out["agreement_with_reference"] = round(same / sum(r.size for r in reference), 6)
        either = [(p > 0) | (r > 0) for p, r in zip(labels, reference)]
        fg = [float((p[e] == r[e]).mean()) if e.any() else 1.0 for p, r, e in zip(labels, reference, either)]
        out["foreground_agreement"] = {"lowest": round(min(fg), 4), "median": round(float(np.median(fg)), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", required=True, help="NAME=PATH[:KEY=VALUE,...]")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--size", type=int, nargs=3, metavar=("Z", "Y", "X"), help="a packed volume of this size")
    where.add_argument("--scans", type=int, help="the first N held-out scans, one at a time")
    ap.add_argument(
        "--content",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="with --size: pack crops into a centred block of this size only; the rest is air (a constant)",
    )
    ap.add_argument("--data", type=Path, default=None, help="with --scans: a dataset folder (default: hippocampus)")
    ap.add_argument("--cases", default=None, help="with --scans: case names, or @split.json:val (default: ours)")
    ap.add_argument(
        "--resample", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"), help="with --scans: resample first"
    )
    ap.add_argument("--phantom-seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", help="configuration the time ratios are taken against")
    ap.add_argument("--reference", help="configuration whose labels the others are compared with")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.content and (not args.size or any(c > n for c, n in zip(args.content, args.size))):
        ap.error("--content needs --size, and must fit inside it")
    configs = [parse_config(c) for c in args.config]
    with tempfile.TemporaryDirectory(prefix="imunet-bench-") as tmp:
        work = Path(tmp)
        inputs, truth, scored = volumes(args, work)
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
        for rep in range(args.repeats):
            for name, path, options in configs:
                out = work / f"{name}.npz"
                runs[name].append(
                    fresh_process(__file__, ["--child", str(path), json.dumps(options), json.dumps(inputs), str(out)])
                )
                print(f"{name:28s} repeat {rep}: {runs[name][-1]['wall_s']:.3f} s", file=sys.stderr, flush=True)
        labels = {name: [np.load(work / f"{name}.npz")[str(i)] for i in range(len(inputs))] for name, _, _ in configs}
    report: dict = {}
    for name, path, options in configs:
        r = runs[name]
        report[name] = {
            "path": str(path),
            "options": options,
            "median_wall_s": median(x["wall_s"] for x in r),
            "walls_s": [round(x["wall_s"], 4) for x in r],
            "peak_rss_gib": round(max(x["peak_rss_gib"] for x in r), 3),
            **{k: v for k, v in r[-1].items() if k not in ("wall_s", "peak_rss_gib")},
            **score(labels[name], truth, labels.get(args.reference) if args.reference != name else None, scored),
        }
    if args.baseline:
        base = report[args.baseline]["median_wall_s"]
        report["ratios"] = {
            f"{n}_over_{args.baseline}": round(report[n]["median_wall_s"] / base, 3) for n, _, _ in configs
        }
    report["setup"] = {
        "volume": describe_volumes(args, len(inputs)),
        "repeats": args.repeats,
        "machine": machine(),
        "command": " ".join(["python", *sys.argv]),
    }
    emit(report, args.json)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
