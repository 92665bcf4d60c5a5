"""The training loop, top to bottom: configuration, data, a train state, steps, validation, checkpoints.

Runs on one CPU or GPU, or on several through ``torchrun`` (DistributedDataParallel; gloo on
CPU, NCCL on CUDA). Every rank samples its own patches; rank 0 logs, validates and saves.
"""

from __future__ import annotations

import csv
import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from imunet.runtime.contract.laterality import lateral_axis, lateral_pairs, swap_permutation
from imunet.runtime.contract.settings import InferenceSettings
from imunet.runtime.imaging.metrics import dice_per_label
from imunet.runtime.imaging.postprocess import decide
from imunet.runtime.kernels.inference import Loop, predict_labels

from .augment import LeftRight, augment_batch
from .budget import TimeBudget
from .config import RunConfig
from .data import (
    Case,
    DatasetInfo,
    DatasetStats,
    PreprocessedCache,
    compute_stats,
    read_dataset,
    read_split,
    split_cases,
)
from .distributed import Dist, pick_device, setup_distributed
from .kinds import Batch, build_model, training_kind
from .model import count_parameters
from .progress import StepProgress
from .run_dir import RunDir
from .sampling import class_locations, sample_patch
from .state import TrainState
from .torch_backend import TorchBackend

__all__ = ["train", "pick_device", "validate", "init_weights", "StartFrom", "RunDir"]
LOG_HEADER = "step,loss,lr,step_s,data_s,augment_s,val_dice_mean\n"


@dataclass(frozen=True)
class TrainCase:
    """One training case in memory: arrays, which classes were annotated, where each class lies."""

    image: np.ndarray
    label: np.ndarray
    known: np.ndarray  # (C,) bool
    locations: dict[int, np.ndarray]  # class -> voxel coordinates (n, 3), annotated classes only


def sample_batch(
    cases: list[TrainCase], cfg: RunConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of ``(B, Z, Y, X)`` image and label patches, positives at ``positive_fraction``, and
    which classes each patch's case annotated ``(B, C)``."""
    imgs, lbls, known = [], [], []
    for _ in range(cfg.train.batch_size):
        case = cases[int(rng.integers(len(cases)))]
        positive = bool(rng.random() < cfg.train.positive_fraction)
        locations = case.locations if cfg.train.class_balanced else None
        pi, pl = sample_patch(case.image, case.label, cfg.model.patch_size, positive, rng, locations)
        imgs.append(pi)
        lbls.append(pl)
        known.append(case.known)
    return np.stack(imgs), np.stack(lbls), np.stack(known)


def optimisation_step(
    net: torch.nn.Module, cfg: RunConfig, batch: Batch, state: TrainState, use_amp: bool
) -> torch.Tensor:
    """One step on an (augmented) batch with the model kind's loss; returns the detached loss."""
    with torch.autocast(device_type=batch.image.device.type, dtype=torch.float16, enabled=use_amp):
        loss = training_kind(cfg.model).loss(net, batch, cfg, state.np_rng)
    state.opt.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.opt)
    state.scaler.update()
    return loss.detach()


def validate(
    model: torch.nn.Module,
    cases: dict[str, tuple[np.ndarray, np.ndarray]],
    cfg: RunConfig,
    device: torch.device,
    settings: InferenceSettings | None = None,
    known: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Per-label Dice on whole held-out volumes through the runtime's sliding-window loop, by label
    index (``val_dice``) and by name (``val_dice_by_name``). ``known``: per case, which classes were
    annotated; a label is scored only on the cases that annotated it (mean over those), never on a
    case where its absence says nothing."""
    labels = list(range(1, cfg.model.num_classes))
    names = cfg.extra.get("labels", {})
    was_training = model.training
    model.eval()
    backend = TorchBackend(model, device)
    settings = settings or InferenceSettings()
    per_case, pairs = {}, []
    for name, (img, lbl) in cases.items():
        pred, _ = predict_labels(np.asarray(img), Loop(backend, cfg.model.patch_size, settings, cfg.model.model_kind))
        scored = [lab for lab in labels if known is None or name not in known or known[name][lab]]
        per_case[name] = dice_per_label(pred, np.asarray(lbl), scored)
        pairs.append((pred, np.asarray(lbl), set(scored)))
    model.train(was_training)
    keep, figures = decide(pairs, labels)
    mean = {
        str(lab): float(np.mean(vals)) if (vals := [d[lab] for d in per_case.values() if lab in d]) else float("nan")
        for lab in labels
    }
    return {
        "val_dice": mean,
        "val_dice_by_name": {names.get(k, k): v for k, v in mean.items()},
        "val_dice_mean": float(np.nanmean(list(mean.values()))) if mean else float("nan"),
        "val_cases_per_label": {str(lab): sum(lab in d for d in per_case.values()) for lab in labels},
        "per_case": {n: {str(k): v for k, v in d.items()} for n, d in per_case.items()},
        "postprocess": {"keep_largest": keep, "dice_by_label": figures},
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
    ckpt = RunDir(source).checkpoint if source.is_dir() else source
    if not ckpt.is_file():
        raise ValueError(f"--init: no checkpoint at {ckpt}")
    conf = RunDir(ckpt.parent).config
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


@dataclass(frozen=True)
class StartFrom:
    """Where a run starts: ``resume`` continues the run folder's own checkpoint; ``init`` starts a
    new run from another run's weights (its model configuration replaces the given one; with
    ``encoder_only`` only the encoder's, and the decoder starts fresh). The optimiser starts afresh."""

    resume: bool = False
    init: Path | None = None
    encoder_only: bool = False


@dataclass(frozen=True)
class Process:
    """This process's place in the run: its device, its rank among the processes, where it reports
    (rank 0 only)."""

    device: torch.device
    ddp: Dist
    say: Callable[[str], None]


@dataclass(frozen=True)
class StepRecord:
    """One step's loss and seconds: the whole step, sampling the batch, augmenting it."""

    loss: float
    step_s: float
    data_s: float
    augment_s: float


@dataclass
class RunData:
    """A run's data after the split, statistics and preprocessing (all done once, on rank 0)."""

    stats: DatasetStats
    train: list[TrainCase]
    val: dict[str, tuple[np.ndarray, np.ndarray]]
    val_known: dict[str, np.ndarray]
    sides: LeftRight | None = None  # paired left/right labels and the axis whose flips swap them


def resolve_config(run: RunDir, cfg: RunConfig, start: StartFrom) -> tuple[RunConfig, dict[str, torch.Tensor] | None]:
    """The run's configuration (a resumed run keeps its stored one; ``start.init`` brings the source
    run's model configuration) and the weights to start from, if any."""
    ckpt_path = run.checkpoint
    if start.resume and not ckpt_path.exists():
        raise ValueError(f"--resume: no {ckpt_path} to resume from")
    if not start.resume and ckpt_path.exists():
        raise ValueError(f"{run.path} already holds a run; pass --resume to continue it or choose another --out")
    if start.resume:  # the stored configuration wins, but for how far this continuation goes
        stored = RunConfig.load(run.config)
        train = replace(stored.train, steps=cfg.train.steps, minutes=cfg.train.minutes)
        return RunConfig(stored.model, train, stored.dataset, stored.extra), None
    if start.init is None:
        return cfg, None
    cfg, state, digest = init_weights(Path(start.init), cfg, start.encoder_only)
    part = "encoder" if start.encoder_only else "model"
    record = {"checkpoint": str(start.init), "sha256": digest, "part": part}
    return replace(cfg, extra={**cfg.extra, "init": record}), state


def prepare_data(dataset_dir: Path, run: RunDir, cfg: RunConfig, proc: Process) -> tuple[RunConfig, RunData]:
    """Split, dataset statistics and preprocessed arrays; the configuration gains the dataset's
    name, modality and labels and is saved as ``RUN/config.json``."""
    ddp, say = proc.ddp, proc.say
    info = read_dataset(dataset_dir)
    if info.labels and len(info.labels) != cfg.model.num_classes:
        raise ValueError(f"model has {cfg.model.num_classes} classes, dataset {len(info.labels)}: {info.labels}")
    split_path, stats_path = run.split, run.dataset_stats
    by_name = {c.name: c for c in info.cases}
    if ddp.main and not split_path.exists():
        if cfg.train.split:
            train_names, val_names = read_split(cfg.train.split, info.cases)
            record = {"from": cfg.train.split, "train": train_names, "val": val_names}
        else:
            train_names, val_names = split_cases(info.cases, cfg.train.val_fraction, cfg.train.seed)
            record = {"seed": cfg.train.seed, "train": train_names, "val": val_names}
        split_path.write_text(json.dumps(record, indent=1))
    ddp.barrier()
    split = json.loads(split_path.read_text())
    if ddp.main and not stats_path.exists():
        say(f"computing dataset statistics over {len(split['train'])} training cases ...")
        stats_path.write_text(json.dumps(compute_stats(info, [by_name[n] for n in split["train"]]).to_dict(), indent=2))
    ddp.barrier()
    stats = DatasetStats.from_dict(json.loads(stats_path.read_text()))
    cache = PreprocessedCache(run.preprocessed, stats)
    if ddp.main:
        t = time.perf_counter()
        cache.load_all([by_name[n] for n in split["train"] + split["val"]])
        say(
            f"preprocessed {len(split['train']) + len(split['val'])} cases in {time.perf_counter() - t:.1f} s "
            f"(spacing {stats.spacing}, normalisation {stats.normalization.scheme})"
        )
    ddp.barrier()
    val = {n: cache.get(by_name[n]) for n in split["val"]}
    if cfg.train.val_max_cases:
        val = dict(list(val.items())[: cfg.train.val_max_cases])
    labels = {str(k): v for k, v in info.labels.items()}
    extra = {**cfg.extra, "dataset_name": info.name, "modality": info.modality, "labels": labels}
    if info.annotated:
        extra["partially_annotated"] = True
    cfg = RunConfig(cfg.model, cfg.train, str(info.root), extra)
    if ddp.main:
        cfg.save(run.config)
    train_cases = training_cases(info, [by_name[n] for n in split["train"]], cache, cfg, say)
    sides = left_right(info.labels, stats.orientation, cfg.model.num_classes)
    if sides is not None:
        pairs = [f"{info.labels[a]}/{info.labels[b]}" for a, b in lateral_pairs(info.labels)]
        say(f"left-right flips swap {', '.join(pairs)}")
    return cfg, RunData(stats, train_cases, val, {n: info.known(n) for n in val}, sides)


def left_right(labels: dict[int, str], orientation: str | None, num_classes: int) -> LeftRight | None:
    """How a left-right flip relabels a batch, or None when the labels have no left/right pairs.
    ``ValueError`` when they have pairs but the data has no orientation to find the axis by."""
    pairs = lateral_pairs(labels)
    if not pairs:
        return None
    axis = lateral_axis(orientation)
    if axis is None:
        raise ValueError("the labels have left/right pairs but the dataset statistics carry no orientation")
    return LeftRight(axis, swap_permutation(num_classes, pairs))


def training_cases(
    info: DatasetInfo, cases: list[Case], cache: PreprocessedCache, cfg: RunConfig, say: Callable[[str], None]
) -> list[TrainCase]:
    """The training cases in memory with their annotated classes and class locations, as the
    partial-label policy asks: "complete" keeps only fully annotated cases, "background" takes every
    class as annotated (absence is background), "marginal" keeps the cases' own annotations."""
    rng = np.random.default_rng(cfg.train.seed)
    policy = cfg.train.partial_labels
    out = []
    for case in cases:
        known = info.known(case.name)
        if policy == "complete" and not known.all():
            continue
        if policy == "background":
            known = np.ones_like(known)
        img, lbl = cache.get(case)
        classes = [c for c in range(1, len(known)) if known[c]]
        out.append(TrainCase(img, lbl, known, class_locations(np.asarray(lbl), classes, rng)))
    if not out:
        raise ValueError("no training case is fully annotated; --partial-labels complete leaves nothing to train on")
    if info.annotated:
        say(f"partial annotation ({policy}): {len(out)} of {len(cases)} training cases used")
    return out


def start_state(
    cfg: RunConfig, proc: Process, weights: dict[str, torch.Tensor] | None, start: StartFrom, run: RunDir
) -> TrainState:
    """The model and its train state: fresh, from ``weights`` (``start.init``), or resumed from the
    run's checkpoint."""
    torch.manual_seed(cfg.train.seed)
    state = TrainState.create(cfg, build_model(cfg.model).to(proc.device), proc.device, proc.ddp.rank)
    if weights is not None:
        result = state.model.load_state_dict(weights, strict=not start.encoder_only)
        fresh = [k for k in result.missing_keys if k.startswith("encoder.")]
        if fresh or result.unexpected_keys:  # only the decoder may start fresh
            raise ValueError(f"--init-encoder: {start.init} does not fit: {(fresh + result.unexpected_keys)[:3]}")
        proc.say(f"starting from the {'encoder ' if start.encoder_only else ''}weights of {start.init}")
    if start.resume:
        state.load(run.checkpoint, proc.ddp.rank)
        proc.say(f"resuming {run.path} at step {state.step} of {cfg.train.steps}")
    return state


def train_step(net: torch.nn.Module, state: TrainState, cfg: RunConfig, data: RunData) -> tuple[float, float, float]:
    """One optimisation step on a fresh batch; returns the loss and the data and augmentation seconds."""
    t0 = time.perf_counter()
    for group in state.opt.param_groups:
        group["lr"] = _lr(cfg, state.step)
    img_np, lbl_np, known_np = sample_batch(data.train, cfg, state.np_rng)
    img = torch.from_numpy(img_np)[:, None].to(state.device)
    lbl = torch.from_numpy(lbl_np).to(device=state.device, dtype=torch.long)
    known = None if known_np.all() else torch.from_numpy(known_np).to(state.device)
    t1 = time.perf_counter()
    if cfg.train.augment:
        img, lbl, known = augment_batch(img, lbl, state.aug_gen, known=known, sides=data.sides)
    t2 = time.perf_counter()
    use_amp = state.scaler.is_enabled()
    loss = float(optimisation_step(net, cfg, Batch(img, lbl, known), state, use_amp))
    if not np.isfinite(loss):
        raise RuntimeError(f"loss became {loss} at step {state.step + 1}; lower the learning rate")
    return loss, t1 - t0, t2 - t1


def train(
    dataset_dir: Path,
    run: Path | RunDir,
    cfg: RunConfig,
    device: torch.device,
    start: StartFrom | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (or resume, or fine-tune: ``start``) a run; returns the final metrics (also in
    ``RUN/metrics.json``)."""
    run, start = RunDir.of(run), start or StartFrom()
    ddp = setup_distributed(device)
    proc = Process(device, ddp, log if ddp.main else (lambda _msg: None))
    if cfg.train.split and not start.resume:  # a bad split is refused before the run folder is made
        read_split(cfg.train.split, read_dataset(dataset_dir).cases)
    run.path.mkdir(parents=True, exist_ok=True)
    cfg, weights = resolve_config(run, cfg, start)
    cfg, data = prepare_data(dataset_dir, run, cfg, proc)
    state = start_state(cfg, proc, weights, start, run)
    net = state.model
    if ddp.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    proc.say(
        f"{cfg.model.kind} model: {count_parameters(state.model):,} parameters; device {device}; "
        f"{len(data.train)} train / {len(data.val)} val cases; world size {ddp.world}"
    )
    if ddp.main and not run.log.exists():
        run.log.write_text(LOG_HEADER)
    metrics: dict[str, Any] = {}
    t_start = time.perf_counter()
    progress = StepProgress(cfg.train.steps, state.step, proc.say) if ddp.main else None
    state.model.train()
    budget = TimeBudget(cfg.train.minutes, state.step, ddp.world == 1)
    while state.step < cfg.train.steps:
        t0 = time.perf_counter()
        loss, data_s, augment_s = train_step(net, state, cfg, data)
        state.step += 1
        if (calibrated := budget.after_step(cfg, state.step)) is not None:
            calibrated = ddp.broadcast(calibrated)
            if calibrated.train.steps != cfg.train.steps:
                cfg = calibrated
                proc.say(f"time budget {cfg.train.minutes:g} min: {cfg.train.steps} steps")
                if ddp.main:
                    progress.retarget(cfg.train.steps)  # type: ignore[union-attr]
                    cfg.save(run.config)
        last = state.step == cfg.train.steps
        if ddp.main:
            record = StepRecord(loss, time.perf_counter() - t0, data_s, augment_s)
            metrics = record_step(state, cfg, data, proc, record, run) or metrics
            progress.update(state.step, loss)  # type: ignore[union-attr]
        if state.step % cfg.train.checkpoint_every == 0 or last:
            state.save(run.checkpoint, cfg, data.stats, ddp)
    if progress is not None:
        progress.close()
    if ddp.main:
        metrics = finish(run, cfg, state, metrics, time.perf_counter() - t_start, proc)
    ddp.barrier()
    return metrics


def record_step(
    state: TrainState, cfg: RunConfig, data: RunData, proc: Process, record: StepRecord, run: RunDir
) -> dict[str, Any] | None:
    """Validate when due (every ``val_every`` steps and at the end), append the step to the history
    and to ``log.csv``; the validation metrics when it validated."""
    metrics, val_mean = None, ""
    due = state.step == cfg.train.steps or (cfg.train.val_every and state.step % cfg.train.val_every == 0)
    if data.val and due:
        metrics = validate(state.model, data.val, cfg, proc.device, known=data.val_known)
        val_mean = f"{metrics['val_dice_mean']:.4f}"
        per_label = ", ".join(f"{k} {v:.4f}" for k, v in metrics["val_dice_by_name"].items())
        proc.say(f"step {state.step}: validation Dice {per_label} (mean {val_mean})")
    state.history.append({"step": state.step, "loss": record.loss, "val": val_mean})
    row = [state.step, f"{record.loss:.5f}", f"{_lr(cfg, state.step - 1):.3g}", f"{record.step_s:.4f}"]
    with run.log.open("a") as fh:
        csv.writer(fh).writerow([*row, f"{record.data_s:.4f}", f"{record.augment_s:.4f}", val_mean])
    return metrics


def finish(
    run: RunDir, cfg: RunConfig, state: TrainState, metrics: dict[str, Any], seconds: float, proc: Process
) -> dict[str, Any]:
    """Write ``metrics.json`` (validation Dice, time, sizes, versions) and ``curves.png``."""
    metrics = {
        **metrics,
        "steps": cfg.train.steps,
        "train_seconds": round(seconds, 1),
        "parameters": count_parameters(state.model),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "device": str(proc.device),
        "world_size": proc.ddp.world,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }
    run.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    plot_curves(run.log, run.curves)
    return metrics


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux reports kilobytes, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


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
