"""The training loop, top to bottom: data, model, steps, validation, checkpoints.

Runs on one CPU or GPU, or on several through ``torchrun`` (DistributedDataParallel; gloo on
CPU, NCCL on CUDA). Every rank samples its own patches; rank 0 logs, validates and saves.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from imunet.runtime.inference import InferenceSettings, predict_labels
from imunet.runtime.metrics import dice_per_label

from .augment import augment_batch
from .config import RunConfig
from .data import DatasetStats, PreprocessedCache, compute_stats, read_dataset, split_cases
from .losses import deep_supervision_loss, point_loss
from .model import build_model, count_parameters
from .progress import StepProgress
from .sampling import point_labels, sample_patch, sample_points
from .torch_backend import TorchBackend

CHECKPOINT = "checkpoint.pt"


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; errors clearly when CUDA is asked for and absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to PyTorch")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def _rng_state(np_rng: np.random.Generator, aug_gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    state = {
        "numpy": json.dumps(np_rng.bit_generator.state),
        "augment": aug_gen.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(
    state: dict[str, Any], np_rng: np.random.Generator, aug_gen: torch.Generator, device: torch.device
) -> None:
    np_rng.bit_generator.state = json.loads(state["numpy"])
    aug_gen.set_state(state["augment"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def sample_batch(
    arrays: list[tuple[np.ndarray, np.ndarray]], cfg: RunConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of ``(B, Z, Y, X)`` image and label patches, positives at ``positive_fraction``."""
    imgs, lbls = [], []
    for _ in range(cfg.train.batch_size):
        img, lbl = arrays[int(rng.integers(len(arrays)))]
        positive = bool(rng.random() < cfg.train.positive_fraction)
        pi, pl = sample_patch(img, lbl, cfg.model.patch_size, positive, rng)
        imgs.append(pi)
        lbls.append(pl)
    return np.stack(imgs), np.stack(lbls)


def points_for_batch(labels: np.ndarray, cfg: RunConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(B, k, 3)`` and their labels ``(B, k)`` for a batch of label patches."""
    t = cfg.train
    pts, tgt = [], []
    for lbl in labels:
        p, _ = sample_points(lbl, t.points, t.boundary_fraction, t.boundary_sigma, rng)
        pts.append(p)
        tgt.append(point_labels(lbl, p))
    return np.stack(pts), np.stack(tgt).astype(np.int64)


def optimisation_step(
    net: torch.nn.Module,
    cfg: RunConfig,
    img: torch.Tensor,
    lbl: torch.Tensor,
    rng: np.random.Generator,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    use_amp: bool,
) -> torch.Tensor:
    """One step on an (augmented) batch: ``img`` ``(B, 1, Z, Y, X)``, ``lbl`` ``(B, Z, Y, X)``.

    The implicit model's points are sampled on the labels it is given; the U-Net takes the whole
    patch with deep supervision. Returns the detached loss.
    """
    device = img.device
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
        if cfg.model.kind == "implicit":
            pts, tgt = points_for_batch(lbl.to(torch.uint8).cpu().numpy(), cfg, rng)
            logits = net(img, torch.from_numpy(pts).to(device))
            loss = point_loss(logits, torch.from_numpy(tgt).to(device))
        else:
            loss = deep_supervision_loss(net(img), lbl)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def validate(
    model: torch.nn.Module,
    cases: dict[str, tuple[np.ndarray, np.ndarray]],
    cfg: RunConfig,
    labels: list[int],
    device: torch.device,
    settings: InferenceSettings | None = None,
) -> dict[str, Any]:
    """Per-label Dice on whole held-out volumes through the runtime's sliding-window loop."""
    was_training = model.training
    model.eval()
    backend = TorchBackend(model, device)
    settings = settings or InferenceSettings()
    per_case = {}
    for name, (img, lbl) in cases.items():
        pred, _ = predict_labels(np.asarray(img), backend, cfg.model.patch_size, settings, cfg.model.kind == "unet")
        per_case[name] = dice_per_label(pred, np.asarray(lbl), labels)
    model.train(was_training)
    mean = {str(lab): float(np.mean([d[lab] for d in per_case.values()])) for lab in labels}
    return {
        "val_dice": mean,
        "val_dice_mean": float(np.mean(list(mean.values()))) if mean else float("nan"),
        "per_case": {n: {str(k): v for k, v in d.items()} for n, d in per_case.items()},
    }


def _lr(cfg: RunConfig, step: int) -> float:
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "poly":
        return t.lr * (1 - step / t.steps) ** 0.9
    return t.lr


ENCODER_FIELDS = ("in_channels", "patch_size", "channels", "convs_per_block")


def init_weights(
    source: Path, cfg: RunConfig, encoder_only: bool = False
) -> tuple[RunConfig, dict[str, torch.Tensor], str]:
    """Model weights to start from (fine-tuning): ``source`` is a run folder or its ``checkpoint.pt``.

    Returns ``cfg`` with the source run's model configuration (so the weights fit), the weights and
    their SHA-256. A source whose class count differs from ``cfg``'s is refused. ``encoder_only``
    takes only the encoder's configuration and weights; the decoder (kind, width, depth, dropout,
    gather) is ``cfg``'s and starts from a fresh initialisation.
    """
    ckpt = source / CHECKPOINT if source.is_dir() else source
    if not ckpt.is_file():
        raise ValueError(f"--init: no checkpoint at {ckpt}")
    conf = ckpt.parent / "config.json"
    if not conf.is_file():
        raise ValueError(f"--init: {conf} is missing; the run's model configuration is needed")
    model_cfg = RunConfig.load(conf).model
    if model_cfg.num_classes != cfg.model.num_classes:
        raise ValueError(
            f"--init: {ckpt} has {model_cfg.num_classes} classes (background included), "
            f"this dataset {cfg.model.num_classes}"
        )
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    except (RuntimeError, KeyError, EOFError) as exc:
        raise ValueError(f"--init: {ckpt} is not an imunet checkpoint ({exc})") from None
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    if encoder_only:
        model_cfg = replace(cfg.model, **{f: getattr(model_cfg, f) for f in ENCODER_FIELDS})
        state = {k: v for k, v in state.items() if k.startswith("encoder.")}
        if not state:
            raise ValueError(f"--init-encoder: {ckpt} holds no encoder weights")
    return replace(cfg, model=model_cfg), state, digest


def train(
    dataset_dir: Path,
    run_dir: Path,
    cfg: RunConfig,
    device: torch.device,
    resume: bool = False,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
    init: Path | None = None,
    init_encoder_only: bool = False,
) -> dict[str, Any]:
    """Train (or resume) a run; returns the final metrics (also in ``RUN/metrics.json``).

    ``init`` starts a new run from another run's weights (its model configuration replaces
    ``cfg.model``; with ``init_encoder_only`` only the encoder's, and the decoder starts fresh);
    the optimiser starts afresh.
    """
    ddp = setup_distributed(device)
    say = log if ddp.main else (lambda _msg: None)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / CHECKPOINT
    if resume and not ckpt_path.exists():
        raise ValueError(f"--resume: no {ckpt_path} to resume from")
    if not resume and ckpt_path.exists():
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if resume:  # the stored configuration wins: a resumed run is the same run
        stored = RunConfig.load(run_dir / "config.json")
        cfg = RunConfig(stored.model, replace(stored.train, steps=cfg.train.steps), stored.dataset, stored.extra)
    init_state: dict[str, torch.Tensor] | None = None
    if init is not None and not resume:
        cfg, init_state, digest = init_weights(Path(init), cfg, init_encoder_only)
        part = "encoder" if init_encoder_only else "model"
        cfg = replace(cfg, extra={**cfg.extra, "init": {"checkpoint": str(init), "sha256": digest, "part": part}})

    # --- data: split, statistics and preprocessing happen once, on rank 0 ---
    info = read_dataset(dataset_dir)
    if info.labels and len(info.labels) != cfg.model.num_classes:
        raise ValueError(f"model has {cfg.model.num_classes} classes, dataset {len(info.labels)}: {info.labels}")
    split_path, stats_path = run_dir / "split.json", run_dir / "dataset_stats.json"
    by_name = {c.name: c for c in info.cases}
    if ddp.main and not split_path.exists():
        train_names, val_names = split_cases(info.cases, cfg.train.val_fraction, cfg.train.seed)
        split_path.write_text(json.dumps({"seed": cfg.train.seed, "train": train_names, "val": val_names}, indent=1))
    ddp.barrier()
    split = json.loads(split_path.read_text())
    if ddp.main and not stats_path.exists():
        say(f"computing dataset statistics over {len(split['train'])} training cases ...")
        stats = compute_stats(info, [by_name[n] for n in split["train"]], cfg.train.seed)
        stats_path.write_text(json.dumps(stats.to_dict(), indent=2))
    ddp.barrier()
    stats = DatasetStats.from_dict(json.loads(stats_path.read_text()))
    cache = PreprocessedCache(cache_dir or run_dir / "preprocessed", stats)
    if ddp.main:
        t = time.perf_counter()
        cache.load_all([by_name[n] for n in split["train"] + split["val"]])
        say(
            f"preprocessed {len(split['train']) + len(split['val'])} cases in {time.perf_counter() - t:.1f} s "
            f"(spacing {stats.spacing}, normalisation {stats.normalization.scheme})"
        )
    ddp.barrier()
    train_arrays = [cache.get(by_name[n]) for n in split["train"]]
    val_cases = {n: cache.get(by_name[n]) for n in split["val"]}
    if cfg.train.val_max_cases:
        val_cases = dict(list(val_cases.items())[: cfg.train.val_max_cases])
    cfg = RunConfig(
        cfg.model,
        cfg.train,
        str(info.root),
        {
            **cfg.extra,
            "dataset_name": info.name,
            "modality": info.modality,
            "labels": {str(k): v for k, v in info.labels.items()},
        },
    )
    if ddp.main:
        cfg.save(run_dir / "config.json")

    # --- model and optimiser ---
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    use_amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    np_rng = np.random.default_rng([cfg.train.seed, ddp.rank])
    aug_gen = torch.Generator().manual_seed(cfg.train.seed * 1009 + ddp.rank)
    start, history = 0, []
    if init_state is not None:
        result = model.load_state_dict(init_state, strict=not init_encoder_only)
        fresh = [k for k in result.missing_keys if k.startswith("encoder.")]
        if fresh or result.unexpected_keys:  # only the decoder may start fresh
            raise ValueError(f"--init-encoder: {init} does not fit: {(fresh + result.unexpected_keys)[:3]}")
        say(f"starting from the {'encoder ' if init_encoder_only else ''}weights of {init}")
    if resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start = int(ckpt["step"])
        history = json.loads(ckpt.get("history", "[]"))
        rng_all = ckpt["rng"]
        _set_rng_state(rng_all[ddp.rank] if ddp.rank < len(rng_all) else rng_all[0], np_rng, aug_gen, device)
        say(f"resuming {run_dir} at step {start} of {cfg.train.steps}")
    net = model
    if ddp.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if ddp.main:
        say(
            f"{cfg.model.kind} model: {count_parameters(model):,} parameters; device {device}; "
            f"{len(train_arrays)} train / {len(val_cases)} val cases; world size {ddp.world}"
        )

    labels = [k for k in range(1, cfg.model.num_classes)]
    log_path = run_dir / "log.csv"
    if ddp.main and not log_path.exists():
        log_path.write_text("step,loss,lr,step_s,data_s,augment_s,val_dice_mean\n")

    def checkpoint(step: int) -> None:
        rng = _rng_state(np_rng, aug_gen, device)
        rngs = [rng]
        if ddp.world > 1:
            rngs = [None] * ddp.world  # type: ignore[list-item]
            dist.all_gather_object(rngs, rng)
        if ddp.main:
            _save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict(),
                    "step": step,
                    "config": json.dumps(cfg.to_dict()),
                    "stats": json.dumps(stats.to_dict()),
                    "rng": rngs,
                    "history": json.dumps(history),
                },
                ckpt_path,
            )

    # --- the loop ---
    model.train()
    metrics: dict[str, Any] = {}
    t_start = time.perf_counter()
    progress = StepProgress(cfg.train.steps, start, say) if ddp.main else None
    for step in range(start, cfg.train.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        img_np, lbl_np = sample_batch(train_arrays, cfg, np_rng)
        img = torch.from_numpy(img_np)[:, None].to(device)
        lbl = torch.from_numpy(lbl_np).to(device=device, dtype=torch.long)
        t1 = time.perf_counter()
        if cfg.train.augment:
            img, lbl = augment_batch(img, lbl, aug_gen)
        t2 = time.perf_counter()
        loss_v = float(optimisation_step(net, cfg, img, lbl, np_rng, opt, scaler, use_amp))
        if not np.isfinite(loss_v):
            raise RuntimeError(f"loss became {loss_v} at step {step + 1}; lower the learning rate")
        step_s = time.perf_counter() - t0
        done = step + 1
        val_mean = ""
        is_last = done == cfg.train.steps
        if ddp.main and ((cfg.train.val_every and done % cfg.train.val_every == 0) or is_last) and val_cases:
            metrics = validate(model, val_cases, cfg, labels, device)
            val_mean = f"{metrics['val_dice_mean']:.4f}"
            say(f"step {done}: validation Dice {metrics['val_dice']} (mean {val_mean})")
        if ddp.main:
            history.append({"step": done, "loss": loss_v, "val": val_mean})
            with log_path.open("a") as fh:
                csv.writer(fh).writerow(
                    [
                        done,
                        f"{loss_v:.5f}",
                        f"{_lr(cfg, step):.3g}",
                        f"{step_s:.4f}",
                        f"{t1 - t0:.4f}",
                        f"{t2 - t1:.4f}",
                        val_mean,
                    ]
                )
            progress.update(done, loss_v)
        if done % cfg.train.checkpoint_every == 0 or is_last:
            checkpoint(done)

    if progress is not None:
        progress.close()
    if ddp.main:
        metrics = {
            **metrics,
            "steps": cfg.train.steps,
            "train_seconds": round(time.perf_counter() - t_start, 1),
            "parameters": count_parameters(model),
            "device": str(device),
            "world_size": ddp.world,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "machine": platform.machine(),
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        plot_curves(log_path, run_dir / "curves.png")
    ddp.barrier()
    return metrics


def plot_curves(log_csv: Path, out_png: Path) -> None:
    """Loss and validation Dice against step, from the CSV log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(log_csv.open()))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    val = [(int(r["step"]), float(r["val_dice_mean"])) for r in rows if r["val_dice_mean"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.6, color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (Dice + CE)")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="tab:red", label="validation Dice")
        ax2.set_ylabel("mean validation Dice")
        ax2.set_ylim(0, 1)
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
