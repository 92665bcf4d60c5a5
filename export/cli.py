"""``imunet-export``: training run -> verified model bundle (ONNX graphs, manifest, TensorRT engines)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(help="Export RUN (an imunet-train directory) to a bundle directory NAME.imunet.")
def export(
    run: Path = typer.Argument(..., help="Training run directory (checkpoint.pt, config.json)."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write, e.g. model.imunet."),
    trt: Optional[str] = typer.Option(None, "--trt", help="Also build TensorRT engines: fp16 | fp32."),
    opset: int = typer.Option(17, help="ONNX opset (TensorRT 10 parses 9..20)."),
    max_points: int = typer.Option(65536, help="Most points per decoder call (TensorRT profile max)."),
    opt_points: int = typer.Option(16384, help="Points per call TensorRT optimises for."),
    overwrite: bool = typer.Option(False, help="Replace an existing bundle at --out."),
    feature_layout: str = typer.Option(
        "auto",
        help="How the encoder hands feature maps to the decoder: auto (level 0 channels-first, deeper "
        "levels channels-last; fastest measured on CPU) | channels_first | channels_last.",
    ),
    overlap: Optional[float] = typer.Option(
        None,
        help="Default window overlap recorded in the manifest (imunet-run --overlap overrides it); "
        "default 0.3. 0.25 is the measured choice for adaptive mode on large volumes (docs/BENCHMARKS.md).",
    ),
) -> None:
    from imunet.runtime.errors import ImunetError

    from .bundle import finalize_manifest, write_bundle

    if trt is not None and trt not in ("fp16", "fp32"):
        typer.echo(f"imunet-export: error: --trt must be fp16 or fp32, got {trt!r}", err=True)
        raise typer.Exit(2)
    if feature_layout not in ("auto", "channels_first", "channels_last"):
        typer.echo(
            "imunet-export: error: --feature-layout must be auto, channels_first or channels_last, "
            f"got {feature_layout!r}",
            err=True,
        )
        raise typer.Exit(2)
    layout = None if feature_layout == "auto" else feature_layout
    try:
        bundle = write_bundle(
            run, out, opset, max_points, overwrite, log=typer.echo, feature_layout=layout, overlap=overlap
        )
    except (ImunetError, ValueError, OSError) as exc:
        typer.echo(f"imunet-export: error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {bundle}")
    if trt is None:
        return
    from .tensorrt import build_engines

    manifest = json.loads((bundle / "manifest.json").read_text())
    graphs = {name: bundle / g["file"] for name, g in manifest["graphs"].items()}
    try:
        record = build_engines(
            bundle,
            graphs,
            trt,
            (1, opt_points, max_points),
            {name: manifest["files"][g["file"]] for name, g in manifest["graphs"].items()},
        )
    except (ImunetError, ValueError, OSError) as exc:
        typer.echo(
            f"imunet-export: --trt {trt}: {exc}; the ONNX bundle at {bundle} is complete without engines", err=True
        )
        raise typer.Exit(3) from None
    manifest["engines"].append(record)
    finalize_manifest(bundle, manifest)
    try:
        from .tensorrt import engine_parity

        record["parity"] = engine_parity(bundle, trt)
        finalize_manifest(bundle, manifest)
        typer.echo(
            f"TensorRT {trt} vs onnxruntime: max |p| difference {record['parity']['max_abs_prob_diff']:.2e}, "
            f"argmax agreement {record['parity']['argmax_agreement']:.4%}"
        )
    except (ImunetError, OSError) as exc:
        typer.echo(f"imunet-export: engines built but their parity check failed: {exc}", err=True)
        raise typer.Exit(3) from None
    times = ", ".join(f"{name} {facts['build_s']} s" for name, facts in record["build"].items())
    typer.echo(f"built TensorRT {trt} engines in {record['dir']} ({times})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
