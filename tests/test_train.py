"""Training: outputs of a run, exact resume, distributed data parallel on gloo, the CLI."""

import csv
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from imunet.config import ModelConfig, RunConfig, TrainConfig  # noqa: E402
from imunet.data import read_dataset, read_split, split_cases  # noqa: E402
from imunet.train import StartFrom, train  # noqa: E402

from conftest import HIPPO, ROOT, TINY_MODEL  # noqa: E402


def small_cfg(steps, **kw):
    return RunConfig(
        ModelConfig(kind="implicit", num_classes=3, **{**TINY_MODEL, "decoder_dropout": 0.1}),
        TrainConfig(
            steps=steps,
            batch_size=2,
            lr=1e-3,
            points=500,
            val_fraction=0.34,
            checkpoint_every=2,
            seed=3,
            lr_schedule="constant",
            **kw,
        ),
    )


def test_run_writes_its_outputs_and_learns(trained_run):
    run, metrics = trained_run
    for name in (
        "checkpoint.pt",
        "config.json",
        "metrics.json",
        "log.csv",
        "curves.png",
        "split.json",
        "dataset_stats.json",
    ):
        assert (run / name).is_file(), name
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 150
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert len(rows) == 150
    assert float(rows[-1]["loss"]) < 0.6 * float(rows[0]["loss"])
    saved = json.loads((run / "metrics.json").read_text())
    assert set(saved["val_dice"]) == {"1", "2"}
    assert saved["val_dice"]["1"] > 0.7, saved["val_dice"]  # the organ of the phantoms is learnt
    stats = json.loads((run / "dataset_stats.json").read_text())
    assert stats["normalization"]["scheme"] == "ct" and stats["spacing"] == [1.5, 1.5, 3.0]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(phantom_dir, tmp_path):
    torch.set_num_threads(1)
    dev = torch.device("cpu")
    quiet = dict(log=lambda _m: None)
    train(phantom_dir, tmp_path / "full", small_cfg(4, augment=True), dev, **quiet)
    train(phantom_dir, tmp_path / "part", small_cfg(2, augment=True), dev, **quiet)
    train(phantom_dir, tmp_path / "part", small_cfg(4, augment=True), dev, StartFrom(resume=True), **quiet)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(phantom_dir, tmp_path):
    with pytest.raises(ValueError, match="no .*checkpoint.pt to resume"):
        train(phantom_dir, tmp_path / "none", small_cfg(1), torch.device("cpu"), StartFrom(resume=True))


def test_dataset_layouts_v1_and_v2(phantom_dir, tmp_path):
    info = read_dataset(phantom_dir)
    assert info.modality == "CT" and info.labels == {0: "background", 1: "organ", 2: "lesion"}
    assert len(info.cases) == 6
    # MSD v1: a 'training' list and v1-style labels
    meta = json.loads((phantom_dir / "dataset.json").read_text())
    v1 = tmp_path / "v1"
    (v1 / "imagesTr").mkdir(parents=True)
    (v1 / "labelsTr").mkdir()
    entries = []
    for c in info.cases[:2]:
        (v1 / "imagesTr" / f"{c.name}.nii.gz").symlink_to(c.image)
        (v1 / "labelsTr" / f"{c.name}.nii.gz").symlink_to(c.label)
        entries.append({"image": f"./imagesTr/{c.name}.nii.gz", "label": f"./labelsTr/{c.name}.nii.gz"})
    (v1 / "dataset.json").write_text(
        json.dumps(
            {
                "name": "v1",
                "modality": {"0": "CT"},
                "labels": {"0": "background", "1": "organ", "2": "lesion"},
                "training": entries,
            }
        )
    )
    info1 = read_dataset(v1)
    assert [c.name for c in info1.cases] == [c.name for c in info.cases[:2]] and info1.labels == info.labels
    assert meta["channel_names"] == {"0": "CT"}
    tr, va = split_cases(info.cases, 0.34, 0)
    assert len(va) == 2 and not set(tr) & set(va) and split_cases(info.cases, 0.34, 0) == (tr, va)


@pytest.mark.skipif(not HIPPO.is_dir(), reason="shared hippocampus data not present")
def test_hippocampus_mixed_intensity_scales_are_normalised_per_image(tmp_path):
    from imunet.data import compute_stats, preprocess_case

    info = read_dataset(HIPPO)
    assert info.labels == {0: "background", 1: "anterior", 2: "posterior"} and len(info.cases) == 208
    stats = compute_stats(info, list(info.cases[:5]))
    assert stats.normalization.scheme == "zscore" and stats.spacing == (1.0, 1.0, 1.0)
    img, lbl = preprocess_case(info.cases[0], stats)
    assert abs(float(img.mean())) < 1e-3 and abs(float(img.std()) - 1) < 1e-3
    assert set(lbl.ravel().tolist()) == {0, 1, 2}


def test_distributed_two_cpu_processes_on_gloo(phantom_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "imunet.cli",
        str(phantom_dir),
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch",
        "1",
        "--patch",
        "16",
        "32",
        "32",
        "--channels",
        "4,8,16,16",
        "--decoder-width",
        "32",
        "--points",
        "300",
        "--device",
        "cpu",
        "--val-fraction",
        "0.34",
        "--no-augment",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size 2" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2  # one sampling state per rank, for exact resume


def test_a_split_file_decides_the_cases_and_a_bad_one_is_refused(phantom_dir, tmp_path):
    dev, quiet = torch.device("cpu"), dict(log=lambda _m: None)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["phantom_002", "phantom_003", "phantom_005"], "val": ["phantom_001"]}))
    train(phantom_dir, tmp_path / "run", small_cfg(1, split=str(split)), dev, **quiet)
    stored = json.loads((tmp_path / "run" / "split.json").read_text())
    assert stored["train"] == ["phantom_002", "phantom_003", "phantom_005"] and stored["val"] == ["phantom_001"]
    assert stored["from"] == str(split)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics["per_case"]) == ["phantom_001"]
    for bad, why in (
        ({"train": ["phantom_001", "nobody"], "val": []}, "1 cases not in the dataset: nobody"),
        ({"train": ["phantom_001"], "val": ["phantom_001"]}, "1 cases in both train and val: phantom_001"),
        ({"val": ["phantom_001"]}, "not a JSON object with 'train' and 'val'"),
        ([{"train": ["phantom_001"], "val": []}], "a list of 1 folds; name one as"),
    ):
        split.write_text(json.dumps(bad))
        out = tmp_path / f"bad{len(why)}"
        with pytest.raises(ValueError, match=why):
            train(phantom_dir, out, small_cfg(1, split=str(split)), dev, **quiet)
        assert not out.exists()
    # nnU-Net's splits_final.json: a list of folds, one named as FILE:N
    folds = tmp_path / "splits_final.json"
    folds.write_text(
        json.dumps(
            [
                {"train": ["phantom_001", "phantom_004"], "val": ["phantom_002"]},
                {"train": ["phantom_002", "phantom_003"], "val": ["phantom_004", "phantom_005"]},
            ]
        )
    )
    info = read_dataset(phantom_dir)
    assert read_split(f"{folds}:1", info.cases) == (["phantom_002", "phantom_003"], ["phantom_004", "phantom_005"])
    with pytest.raises(ValueError, match=r"no fold 2 \(the file has folds 0 to 1\)"):
        read_split(f"{folds}:2", info.cases)
    split.write_text(json.dumps({"train": ["phantom_001"], "val": ["phantom_002"]}))
    with pytest.raises(ValueError, match="holds one split, not a list of folds"):
        read_split(f"{split}:0", info.cases)


def test_train_cli_refuses_a_bad_split_before_making_the_run_folder(phantom_dir, tmp_path):
    (tmp_path / "folds.json").write_text(json.dumps([{"train": ["phantom_001"], "val": []}]))
    res = subprocess.run(
        [sys.executable, "-m", "imunet.cli", str(phantom_dir), "--out", str(tmp_path / "r")]
        + ["--split", f"{tmp_path / 'folds.json'}:1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and not (tmp_path / "r").exists()
    assert res.stderr.strip().splitlines() == [
        f"imunet-train: error: split {tmp_path / 'folds.json'}:1: no fold 1 (the file has folds 0 to 0)"
    ]


def test_train_cli_reports_bad_dataset_in_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "imunet.cli", str(tmp_path), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.strip() == f"imunet-train: error: {tmp_path}: no dataset.json (expected the MSD / nnU-Net layout)"


def test_progress_reports_every_five_percent_off_a_terminal_and_runs_live():
    from imunet.progress import StepProgress

    lines = []
    p = StepProgress(100, 40, lines.append, live=False)
    for step in range(41, 101):
        p.update(step, 0.5)
    p.close()
    assert [ln.split()[1] for ln in lines] == [f"{s}/100" for s in range(45, 101, 5)]
    assert "loss 0.5000" in lines[-1] and "steps/s" in lines[-1] and "min left" in lines[-1]
    live = StepProgress(3, 0, lines.append, live=True)
    for step in (1, 2, 3):
        live.update(step, 0.1)
    live.close()
    assert len(lines) == 12  # the live bar prints nothing through `say`


def test_init_fine_tunes_from_another_run_s_weights(trained_run, phantom_dir, tmp_path):
    from dataclasses import replace

    source, _ = trained_run
    cfg = small_cfg(1, augment=False)
    cfg = replace(cfg, model=replace(cfg.model, decoder_width=16), train=replace(cfg.train, lr=1e-9))
    metrics = train(phantom_dir, tmp_path / "ft", cfg, torch.device("cpu"), StartFrom(init=source), log=lambda _m: None)
    # One step at a negligible learning rate: the organ is segmented only because the weights came along.
    assert metrics["val_dice"]["1"] > 0.7, metrics["val_dice"]
    stored = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert stored["model"] == json.loads((source / "config.json").read_text())["model"]  # the source's widths
    assert len(stored["extra"]["init"]["sha256"]) == 64


def test_init_encoder_keeps_the_encoder_and_builds_a_new_decoder(trained_run, phantom_dir, tmp_path):
    from dataclasses import replace

    source, _ = trained_run
    src_cfg = json.loads((source / "config.json").read_text())["model"]
    cfg = small_cfg(1, augment=False)
    cfg = replace(
        cfg, model=replace(cfg.model, decoder_width=24, channels=(4, 8, 8, 8)), train=replace(cfg.train, lr=1e-9)
    )
    train(phantom_dir, tmp_path / "enc", cfg, torch.device("cpu"), StartFrom(init=source, encoder_only=True),
          log=lambda _m: None)  # fmt: skip
    stored = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert stored["model"]["decoder_width"] == 24 != src_cfg["decoder_width"]  # the options' decoder
    assert stored["model"]["channels"] == src_cfg["channels"]  # the source's encoder
    assert stored["extra"]["init"]["part"] == "encoder"
    got = torch.load(tmp_path / "enc" / "checkpoint.pt", weights_only=True)["model"]
    want = torch.load(source / "checkpoint.pt", weights_only=True)["model"]
    enc = [k for k in want if k.startswith("encoder.")]
    assert enc and all(torch.allclose(got[k], want[k], atol=1e-6) for k in enc)  # one step at lr 1e-9
    assert got["decoder.out.weight"].shape[1] == 24


def test_init_refuses_what_does_not_fit(trained_run, tmp_path):
    from dataclasses import replace

    from imunet.train import init_weights

    source, _ = trained_run
    cfg = small_cfg(1)
    with pytest.raises(ValueError, match="no checkpoint"):
        init_weights(tmp_path, cfg)
    with pytest.raises(ValueError, match="has 3 classes"):
        init_weights(source, replace(cfg, model=replace(cfg.model, num_classes=4)))


def test_a_time_budget_sets_the_step_count_from_the_measured_speed():
    from imunet.budget import budget_steps
    from imunet.config import ModelConfig, RunConfig, TrainConfig

    cfg = RunConfig(ModelConfig(), TrainConfig(steps=100_000, minutes=10))
    # 40 steps done in 20 s at 2 steps/s: 570 s of the 600 s budget are for training (5% kept aside)
    assert budget_steps(cfg, 40, 2.0, 20.0).train.steps == 40 + int(2.0 * 550)
    assert budget_steps(RunConfig(ModelConfig(), TrainConfig(steps=500, minutes=10)), 40, 2.0, 20.0).train.steps == 500
    assert budget_steps(cfg, 40, 2.0, 9999.0).train.steps == 41  # over budget already: stop at the next step
    with pytest.raises(ValueError, match="minutes must be >= 0"):
        TrainConfig(minutes=-1)


def simulated_budget(monkeypatch, configured: int, step_seconds) -> tuple[int, float, list[int]]:
    """A 10-minute budget over steps taking ``step_seconds(step)`` on a fake clock: the steps run,
    the seconds they took and every step count the budget set."""
    from imunet import budget
    from imunet.config import ModelConfig, RunConfig, TrainConfig

    clock = [0.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    cfg = RunConfig(ModelConfig(), TrainConfig(steps=configured, minutes=10))
    timer, step, counts = budget.TimeBudget(10, 0, True), 0, []
    while step < cfg.train.steps:
        clock[0] += step_seconds(step)
        step += 1
        if (new := timer.after_step(cfg, step)) is not None:
            cfg = new
            counts.append(cfg.train.steps)
    return step, clock[0], counts


def test_a_run_slowed_half_way_still_ends_inside_its_budget(monkeypatch):
    """Steps of 0.5 s, then 1.5 s from step 300 (other work took the cores): the step count set at
    the start would run 1,410 s of a 600 s budget; re-set every 50 steps it ends inside the budget."""
    step, seconds, counts = simulated_budget(monkeypatch, 100_000, lambda k: 0.5 if k < 300 else 1.5)
    assert counts[0] == 40 + int(2.0 * (570 - 20))  # calibrated at step 40: 1,140 steps
    assert seconds <= 600 and step == counts[-1] < 700
    assert counts == sorted(counts, reverse=True)  # only ever fewer once the steps slowed


def test_a_run_calibrated_while_slow_takes_more_steps_when_the_machine_frees(monkeypatch):
    """Steps of 2 s while other work runs, 0.5 s after step 100: the count calibrated at the start
    (about 300) grows to what the rest of the budget holds (840 at most: 200 s, then 370 s at 0.5 s),
    or to the configured steps where they are fewer, and the run still ends inside the budget."""
    for configured in (100_000, 600):
        step, seconds, counts = simulated_budget(monkeypatch, configured, lambda k: 2.0 if k < 100 else 0.5)
        assert counts[0] < 320 and seconds <= 600
        assert 800 <= step <= 840 if configured > 840 else step == configured


def test_dataset_statistics_record_orientation_and_fingerprint(phantom_dir):
    from imunet.data import DatasetStats, compute_stats, read_dataset

    info = read_dataset(phantom_dir)
    stats = compute_stats(info, list(info.cases))
    fp = stats.fingerprint
    assert stats.orientation == "LPS"  # SimpleITK's default direction, as the phantoms are written
    assert fp.cases == len(info.cases) and fp.modality == "CT" and fp.intensity_space == "raw"  # HU, as CT is
    assert fp.intensity_min[0] == -1024.0 and fp.spacing_min == fp.spacing_max == (1.5, 1.5, 3.0)
    assert all(lo <= mid <= hi for lo, mid, hi in zip(fp.extent_min, fp.extent_median, fp.extent_max))
    assert DatasetStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats
