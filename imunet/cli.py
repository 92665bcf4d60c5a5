"""``imunet-train``: train the Implicit U-Net (or the dense U-Net baseline) on an MSD-layout dataset."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def _version(value: bool) -> None:
    if value:
        from imunet import __version__

        typer.echo(f"imunet-train {__version__}")
        raise typer.Exit()


def _param_table() -> str:
    from .config import ModelConfig
    from .kinds import build_model
    from .model import count_parameters

    imp = build_model(ModelConfig(kind="implicit", num_classes=3))
    unet = build_model(ModelConfig(kind="unet", num_classes=3))
    enc = count_parameters(imp.encoder)
    return (
        f"Parameters at the defaults (3 classes): encoder {enc:,}; implicit decoder "
        f"{count_parameters(imp.decoder):,} (Implicit U-Net {count_parameters(imp):,}); "
        f"U-Net decoder {count_parameters(unet) - enc:,} (U-Net {count_parameters(unet):,})."
    )


@app.command(help="Train on DATASET (MSD / nnU-Net layout: imagesTr/, labelsTr/, dataset.json).")
def train(
    dataset: Path = typer.Argument(..., help="Dataset folder."),
    out: Path = typer.Option(..., "--out", help="Run directory (checkpoint.pt, config.json, metrics.json, log.csv)."),
    model: str = typer.Option("implicit", help="implicit | unet"),
    patch: Optional[tuple[int, int, int]] = typer.Option(
        None, help="Patch size Z Y X (multiples of 8); default: the median case shape, capped at 96 160 160."
    ),
    steps: int = typer.Option(6000, help="Optimisation steps (with --minutes: at most this many)."),
    minutes: float = typer.Option(
        0.0, help="Time budget: the step count follows the measured speed, re-set every 50 steps (0: off)."
    ),
    batch: int = typer.Option(8, help="Patches per step (per process)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in --out where it stopped, with its stored configuration; --steps and "
        "--minutes set how far it goes now.",
    ),
    val_fraction: float = typer.Option(0.2, help="Fraction of cases held out for validation."),
    split: Optional[str] = typer.Option(
        None,
        help="Train and validate on the cases this JSON names ('train' and 'val' lists, e.g. another "
        "run's split.json; FILE:N for fold N of nnU-Net's splits_final.json) instead of drawing a split "
        "with --val-fraction and --seed.",
    ),
    val_every: int = typer.Option(0, help="Validate every N steps (0: only at the end)."),
    seed: int = typer.Option(0, help="Seed for the split, initialisation and sampling."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate."),
    points: Optional[int] = typer.Option(
        None, help="k: points per patch; default min(30000, 5% of the patch), the paper's 30,000 at 96x160x160."
    ),
    alpha: float = typer.Option(0.5, help="Fraction of points sampled near label boundaries."),
    sigma: float = typer.Option(5.0, help="Std (voxels) of the displacement of boundary points."),
    channels: str = typer.Option("16,32,64,128", help="Encoder channels per block."),
    decoder_width: int = typer.Option(256, help="Implicit decoder width."),
    dropout: float = typer.Option(0.1, help="Implicit decoder dropout."),
    gather: str = typer.Option("floor", help="floor (paper: p // 2**b) | nearest (nearest cell centre)."),
    positive_fraction: float = typer.Option(1 / 3, help="Fraction of patches centred on foreground."),
    class_balanced: bool = typer.Option(
        True,
        "--class-balanced/--no-class-balanced",
        help="Centre positive patches on a uniformly drawn class and split boundary points equally per class.",
    ),
    partial_labels: str = typer.Option(
        "marginal",
        help="With annotated.json: marginal (unannotated organs merge into background in the loss) | "
        "background (absence is background) | complete (train on fully annotated cases only).",
    ),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Spatial and intensity augmentation."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA."),
    lr_schedule: str = typer.Option("poly", help="poly (nnU-Net's) | constant"),
    checkpoint_every: int = typer.Option(100, help="Save a checkpoint every N steps."),
    cache: Optional[Path] = typer.Option(None, help="Folder for preprocessed arrays (default RUN/preprocessed)."),
    init: Optional[Path] = typer.Option(
        None,
        help="Fine-tune: start from this run's (or checkpoint's) weights; its model configuration "
        "(patch, channels, decoder) replaces the model options.",
    ),
    init_encoder: Optional[Path] = typer.Option(
        None,
        help="Start only the encoder from this run's weights (its patch and channels replace the options); "
        "the decoder is built from the options and trained from scratch.",
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    from .config import ModelConfig, RunConfig, TrainConfig
    from .data import read_dataset

    try:
        chans = tuple(int(c) for c in channels.split(","))
        info = read_dataset(dataset)
        if patch is None:
            from .data import auto_patch_size

            patch = auto_patch_size(info)
            if init is None and init_encoder is None and not resume:
                typer.echo(f"patch size {patch[0]} {patch[1]} {patch[2]} (median case shape; set --patch to change)")
        if points is None:
            points = int(min(30000, 0.05 * patch[0] * patch[1] * patch[2]))
        mcfg = ModelConfig(
            kind=model,
            num_classes=len(info.labels),
            patch_size=tuple(patch),
            channels=chans,
            convs_per_block=(2, 2, 4, 4, 4, 4)[: len(chans)],
            decoder_width=decoder_width,
            decoder_dropout=dropout,
            gather=gather,
        )
        tcfg = TrainConfig(
            steps=steps,
            batch_size=batch,
            lr=lr,
            points=points,
            boundary_fraction=alpha,
            boundary_sigma=sigma,
            positive_fraction=positive_fraction,
            class_balanced=class_balanced,
            partial_labels=partial_labels,
            augment=augment,
            amp=amp,
            val_fraction=val_fraction,
            split=split or "",
            val_every=val_every,
            seed=seed,
            lr_schedule=lr_schedule,
            checkpoint_every=checkpoint_every,
            minutes=minutes,
        )
        from .distributed import pick_device
        from .run_dir import RunDir
        from .train import StartFrom
        from .train import train as run_training

        if init is not None and init_encoder is not None:
            raise ValueError("pass --init or --init-encoder, not both")
        start = StartFrom(resume, init or init_encoder, init_encoder is not None)
        metrics = run_training(dataset, RunDir(out, cache), RunConfig(mcfg, tcfg), pick_device(device), start)
    except (ValueError, OSError) as exc:
        typer.echo(f"imunet-train: error: {exc}", err=True)
        raise typer.Exit(2) from None
    if metrics.get("val_dice_by_name"):
        per_label = ", ".join(f"{k} {v:.4f}" for k, v in metrics["val_dice_by_name"].items())
        typer.echo(f"validation Dice: {per_label} (mean {metrics['val_dice_mean']:.4f})")


def main() -> None:
    try:
        app()
    except SystemExit:
        if "--help" in sys.argv or "-h" in sys.argv:
            typer.echo(_param_table())
        raise


if __name__ == "__main__":
    main()
