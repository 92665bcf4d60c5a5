"""Training cost of the Implicit U-Net against the dense U-Net on the same patch, side by side.

Each measurement runs in a fresh subprocess (so peak memory is that model's alone), alternating
implicit / U-Net for ``--rounds`` rounds. Reports the median seconds per optimisation step
(forward, loss, backward, AdamW), the augmentation's share, and peak memory: resident set size
on the CPU (``ru_maxrss``), ``torch.cuda.max_memory_allocated`` on CUDA.

    python tools/bench_train.py --patch 40 56 40 --channels 16,32,64,128 --width 256 --points 4000 --batch 4
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from harness import emit, fresh_process, machine, median


def one(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from imunet.augment import augment_batch
    from imunet.config import ModelConfig, RunConfig, TrainConfig
    from imunet.kinds import Batch, build_model
    from imunet.model import count_parameters
    from imunet.state import TrainState
    from imunet.train import optimisation_step

    torch.manual_seed(0)
    dev = torch.device(args.device)
    patch = tuple(args.patch)
    cfg = ModelConfig(
        kind=args.one,
        num_classes=3,
        patch_size=patch,
        channels=tuple(args.channels),
        decoder_width=args.width,
        decoder_dropout=0.2,
    )
    amp = dev.type == "cuda" and args.amp
    run_cfg = RunConfig(cfg, TrainConfig(batch_size=args.batch, points=args.points, amp=amp, lr=1e-4))
    model = build_model(cfg).to(dev).train()
    state = TrainState.create(run_cfg, model, dev, 0)
    z, y, x = np.indices(patch)
    c = np.asarray(patch) / 2
    label = (
        (((z - c[0]) / (patch[0] / 4)) ** 2 + ((y - c[1]) / (patch[1] / 4)) ** 2 + ((x - c[2]) / (patch[2] / 3)) ** 2)
        <= 1
    ).astype(np.uint8)
    label[(((z - c[0]) / 3) ** 2 + ((y - c[1]) / 4) ** 2 + ((x - c[2]) / 4) ** 2) <= 1] = 2
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(args.batch, 1, *patch, device=dev)
    lbl = torch.from_numpy(np.stack([label] * args.batch)).to(dev, torch.long)
    step_times, aug_times = [], []
    for i in range(args.warmup + args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a_img, a_lbl, _ = augment_batch(img, lbl, gen)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        optimisation_step(model, run_cfg, Batch(a_img, a_lbl), state, amp)  # exactly the training step
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i >= args.warmup:
            step_times.append(t2 - t1)
            aug_times.append(t1 - t0)
    peak = (
        torch.cuda.max_memory_allocated(dev) / 2**20
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "model": args.one,
        "parameters": count_parameters(model),
        "step_s": step_times,
        "augment_s": aug_times,
        "peak_mb": round(peak, 1),
        "memory": "cuda max allocated" if dev.type == "cuda" else "process max RSS",
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", type=int, nargs=3, default=(40, 56, 40))
    ap.add_argument("--channels", type=lambda s: [int(c) for c in s.split(",")], default=[16, 32, 64, 128])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--points", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--one", choices=["implicit", "unet"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    base = sys.argv[1:]
    if "--json" in base:
        i = base.index("--json")
        base = base[:i] + base[i + 2 :]
    results: dict[str, list[dict]] = {"implicit": [], "unet": []}
    for _ in range(args.rounds):
        for kind in results:
            results[kind].append(fresh_process(__file__, [*base, "--one", kind]))
    summary = {}
    for kind, runs in results.items():
        summary[kind] = {
            "parameters": runs[0]["parameters"],
            "median_step_s": median(s for r in runs for s in r["step_s"]),
            "median_augment_s": median(s for r in runs for s in r["augment_s"]),
            "peak_mb": max(r["peak_mb"] for r in runs),
            "memory": runs[0]["memory"],
            "threads": runs[0]["threads"],
            "n_steps": sum(len(r["step_s"]) for r in runs),
        }
    imp, unet = summary["implicit"], summary["unet"]
    summary["ratios_implicit_over_unet"] = {
        "step_time": round(imp["median_step_s"] / unet["median_step_s"], 3),
        "peak_memory": round(imp["peak_mb"] / unet["peak_mb"], 3),
        "parameters": round(imp["parameters"] / unet["parameters"], 3),
    }
    summary["setup"] = {
        "patch": args.patch,
        "channels": args.channels,
        "decoder_width": args.width,
        "points": args.points,
        "batch": args.batch,
        "device": args.device,
        "amp": args.amp,
        "machine": machine(),
        "command": " ".join(["python", *sys.argv]),
    }
    emit(summary, args.json)


if __name__ == "__main__":
    main()
