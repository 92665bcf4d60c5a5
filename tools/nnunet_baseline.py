"""nnU-Net v2 on the same split and the same CPU-time budget as our own training, for a fair comparison.

nnU-Net is a benchmark here, never a dependency of imunet. Install it beside imunet, with torch
pinned so that pip keeps the CPU build (otherwise it pulls a CUDA build of several GB):

    pip install nnunetv2 torch==2.13.0

Three steps, each a subcommand (all nnU-Net folders under ``--work``):

    python tools/nnunet_baseline.py prepare --work W --data ../shared/data/hippocampus
    taskset -c 1 python tools/nnunet_baseline.py train --work W --minutes 90 --name m90
    python tools/nnunet_baseline.py predict --work W --name m90 --out preds/ [--mirroring]
    imunet-evaluate --references ../shared/data/hippocampus/labelsTr --predictions preds/ --csv scores.csv

``prepare`` plans and preprocesses the dataset with nnU-Net's ``3d_fullres`` configuration and writes
our fixed split (``docs/results/hippocampus_split.json``) as its fold 0. ``train`` runs nnU-Net's own
trainer on one thread with a time budget: epochs of ``--iterations`` iterations (nnU-Net's are 250,
over an hour each on one CPU thread), the number of epochs set from the first epoch's time so that
its polynomial learning-rate schedule ends when the budget does, exactly as ``imunet-train
--minutes`` does for ours. ``predict`` segments the split's validation images with the final
checkpoint (nnU-Net's sliding window, mirroring off unless asked: our default has no test-time
mirroring either).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPLIT = REPO / "docs" / "results" / "hippocampus_split.json"
DATASET = "Dataset004_Hippocampus"


def environment(work: Path) -> None:
    """nnU-Net reads its three folders from the environment when it is first imported."""
    for key, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        os.environ[key] = str(work / sub)
        (work / sub).mkdir(parents=True, exist_ok=True)


def prepare(work: Path, data: Path) -> None:
    raw = work / "raw" / DATASET
    if not raw.exists():
        raw.symlink_to(data.resolve())
    subprocess.run(
        [
            str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"),
            "-d",
            "4",
            "-c",
            "3d_fullres",
            "-np",
            "2",
            "--verify_dataset_integrity",
        ],
        check=True,
    )
    split = json.loads(SPLIT.read_text())
    target = work / "preprocessed" / DATASET / "splits_final.json"
    target.write_text(json.dumps([{"train": split["train"], "val": split["val"]}], indent=1))
    print(f"{target}: fold 0 = our split ({len(split['train'])} train / {len(split['val'])} val)")


class BudgetReached(Exception):
    pass


def budget_trainer(minutes: float, iterations: int):
    """nnU-Net's trainer with short epochs and a time budget (its methods, not a copy of its loop)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerBudget(nnUNetTrainer):
        def __init__(  # nnU-Net reads its arguments back by name: the signature must be its own
            self,
            plans: dict,
            configuration: str,
            fold: int,
            dataset_json: dict,
            device: torch.device = torch.device("cpu"),
        ) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = max(1, iterations // 5)
            self.num_epochs = 100_000  # set from the first epoch's time in on_epoch_end
            self.save_every = 1
            self.budget_s = minutes * 60
            self.started = None

        def on_train_start(self) -> None:
            super().on_train_start()
            self.started = time.time()

        def on_epoch_end(self) -> None:
            super().on_epoch_end()  # advances current_epoch
            elapsed = time.time() - self.started
            if self.current_epoch == 1:
                epochs = max(2, int(self.budget_s / elapsed))
                self.num_epochs = epochs
                self.lr_scheduler.max_steps = epochs
                self.print_to_log_file(f"time budget {self.budget_s / 60:g} min: {epochs} epochs of {iterations}")
            if self.current_epoch >= self.num_epochs:
                raise BudgetReached

    torch.set_num_threads(1)
    return nnUNetTrainerBudget


def train(work: Path, minutes: float, iterations: int, name: str) -> None:
    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in the training process: one core in all
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    pre = work / "preprocessed" / DATASET
    cls = budget_trainer(minutes, iterations)
    cls.__name__ = f"nnUNetTrainerBudget_{name}"  # its own results folder per budget
    plans = {**load_json(pre / "nnUNetPlans.json"), "continue_training": False}  # as nnU-Net's own launcher sets
    trainer = cls(plans, "3d_fullres", 0, load_json(pre / "dataset.json"),
                  device=torch.device("cpu"))  # fmt: skip
    t = time.time()
    try:
        trainer.run_training()
    except BudgetReached:
        trainer.on_train_end()  # writes checkpoint_final.pth
    report = {
        "minutes": minutes,
        "seconds": round(time.time() - t, 1),
        "epochs": trainer.current_epoch,
        "iterations_per_epoch": iterations,
        "batch_size": trainer.batch_size,
        "patch_size": list(trainer.configuration_manager.patch_size),
        "output": str(trainer.output_folder),
    }
    print(json.dumps(report))
    (Path(trainer.output_folder) / "budget.json").write_text(json.dumps(report, indent=1))


def load_predictor(folder: Path, mirroring: bool):
    """nnU-Net's predictor on the final checkpoint, set up by hand: its own set-up searches every
    trainer module by name (ours is not among them, and importing them all pulls in torchvision)."""
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset_json = load_json(folder / "plans.json"), load_json(folder / "dataset.json")
    manager = PlansManager(plans)
    config = manager.get_configuration("3d_fullres")
    numpy_types = [np._core.multiarray.scalar, np.dtype, type(np.dtype("float64")), type(np.dtype("float32"))]
    with torch.serialization.safe_globals(numpy_types):  # nnU-Net stores numpy scalars in its logs
        ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    network = nnUNetTrainer.build_network_architecture(
        manager, config, determine_num_input_channels(manager, config, dataset_json),
        manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False,
    )  # fmt: skip
    predictor = nnUNetPredictor(use_mirroring=mirroring, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(
        network, manager, config, [ckpt["network_weights"]], dataset_json, ckpt["trainer_name"],
        ckpt["inference_allowed_mirroring_axes"],
    )  # fmt: skip
    return predictor


def predict(work: Path, name: str, out: Path, mirroring: bool) -> None:
    import torch

    torch.set_num_threads(2)
    folder = work / "results" / DATASET / f"nnUNetTrainerBudget_{name}__nnUNetPlans__3d_fullres"
    split = json.loads(SPLIT.read_text())
    images = work / "raw" / DATASET / "imagesTr"
    cases = [[str(images / f"{c}_0000.nii.gz")] for c in split["val"]]
    predictor = load_predictor(folder, mirroring)
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    predictor.predict_from_files_sequential(cases, str(out), save_probabilities=False, overwrite=True)
    print(json.dumps({"cases": len(cases), "seconds": round(time.time() - t, 1), "mirroring": mirroring}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    for step in ("prepare", "train", "predict"):
        p = sub.add_parser(step)
        p.add_argument("--work", type=Path, required=True, help="folder for nnU-Net's raw, preprocessed, results")
    sub.choices["prepare"].add_argument("--data", type=Path, required=True, help="the dataset (nnU-Net v2 layout)")
    sub.choices["train"].add_argument("--minutes", type=float, required=True)
    sub.choices["train"].add_argument("--iterations", type=int, default=25, help="iterations per epoch")
    for step in ("train", "predict"):
        sub.choices[step].add_argument("--name", required=True, help="names the run (one per budget)")
    sub.choices["predict"].add_argument("--out", type=Path, required=True)
    sub.choices["predict"].add_argument("--mirroring", action="store_true", help="nnU-Net's test-time mirroring")
    args = ap.parse_args()
    environment(args.work)
    if args.step == "prepare":
        prepare(args.work, args.data)
    elif args.step == "train":
        train(args.work, args.minutes, args.iterations, args.name)
    else:
        predict(args.work, args.name, args.out, args.mirroring)


if __name__ == "__main__":
    sys.exit(main())
