"""``imunet-evaluate``: a folder of predictions against a folder of reference labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"imunet-evaluate {version('imunet')}")
        raise typer.Exit()


@app.command(help="Dice, HD95 (mm) and volumes (ml) per case and label, predictions against references.")
def evaluate(
    references: Path = typer.Option(..., "--references", "-r", help="Folder of reference label maps."),
    predictions: Path = typer.Option(..., "--predictions", "-p", help="Folder of predicted label maps."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Write one row per case and label."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary and every score as JSON."),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="The bundle (folder or shipped name) that made the predictions: its label names, and a warning "
        "when the references are its training cases. Default names: the references' dataset.json, else numbers.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing --csv / --json files."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    from dataclasses import asdict

    from ..errors import ImunetError
    from ..imaging.atomic import write_text_atomic
    from .evaluation import pair_folders, reference_labels, score_pairs, summary, to_csv

    try:
        names, trained_on = reference_labels(references), set()
        if model is not None:
            from ..contract.bundle import load_bundle, resolve_model

            manifest = load_bundle(resolve_model(model), verify=False).manifest
            names, trained_on = manifest.labels, set(manifest.provenance.training_cases)
        pairs, no_reference, no_prediction = pair_folders(references, predictions)
        scores = score_pairs(pairs, names)
        if csv is not None:
            write_text_atomic(csv, to_csv(scores), overwrite)
        if json_out is not None:
            payload = {"summary": summary(scores), "scores": [asdict(s) for s in scores]}
            write_text_atomic(json_out, json.dumps(payload, indent=2) + "\n", overwrite)
    except (ImunetError, ValueError, OSError) as exc:
        typer.echo(f"imunet-evaluate: error: {exc}", err=True)
        raise typer.Exit(2) from None
    for cases, what in ((no_reference, "predictions without a reference"), (no_prediction, "references without a "
                                                                            "prediction")):  # fmt: skip
        if cases:
            shown = ", ".join(cases[:5]) + (", ..." if len(cases) > 5 else "")
            typer.echo(f"note: {len(cases)} {what}, not scored: {shown}", err=True)
    seen = [case for case, _, _ in pairs if case in trained_on]
    if seen:
        typer.echo(
            f"WARNING: {len(seen)} of {len(pairs)} cases are among the cases the model trained on: their scores "
            "overstate its accuracy on new scans",
            err=True,
        )
    cases = len({s.case for s in scores})
    typer.echo(f"{cases} cases")
    for name, s in summary(scores).items():
        typer.echo(
            f"  {name:14s} Dice {s['dice_mean']:.4f} +- {s['dice_std']:.4f}   HD95 {s['hd95_mean']:.2f} mm"
            f" ({s['hd95_undefined']} undefined)"
        )


def main() -> None:
    app(prog_name="imunet-evaluate")


if __name__ == "__main__":
    main()
