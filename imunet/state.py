"""What a training run carries between steps and across restarts: model, optimiser, scaler, random
generators, step and history. Saved atomically as ``checkpoint.pt`` (tensors and JSON strings only,
so it loads with ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from imunet.runtime.imaging.atomic import atomic_output

from .config import RunConfig
from .data import DatasetStats
from .distributed import Dist


def rng_state(np_rng: np.random.Generator, aug_gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    state = {
        "numpy": json.dumps(np_rng.bit_generator.state),
        "augment": aug_gen.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(
    state: dict[str, Any], np_rng: np.random.Generator, aug_gen: torch.Generator, device: torch.device
) -> None:
    np_rng.bit_generator.state = json.loads(state["numpy"])
    aug_gen.set_state(state["augment"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class TrainState:
    """Everything a step changes. ``history``: ``{"step", "loss", "val"}`` per step."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    np_rng: np.random.Generator
    aug_gen: torch.Generator
    device: torch.device
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def create(cls, cfg: RunConfig, model: torch.nn.Module, device: torch.device, rank: int) -> TrainState:
        """A fresh state: AdamW, a gradient scaler (active on CUDA with ``amp``), seeded generators."""
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp and device.type == "cuda")
        np_rng = np.random.default_rng([cfg.train.seed, rank])
        aug_gen = torch.Generator().manual_seed(cfg.train.seed * 1009 + rank)
        return cls(model, opt, scaler, np_rng, aug_gen, device)

    def save(self, path: Path, cfg: RunConfig, stats: DatasetStats, ddp: Dist) -> None:
        """Write the checkpoint (rank 0; every rank's generator state is gathered first)."""
        rngs = [rng_state(self.np_rng, self.aug_gen, self.device)]
        if ddp.world > 1:
            mine, rngs = rngs[0], [None] * ddp.world  # type: ignore[list-item]
            dist.all_gather_object(rngs, mine)
        if not ddp.main:
            return
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "config": json.dumps(cfg.to_dict()),
            "stats": json.dumps(stats.to_dict()),
            "rng": rngs,
            "history": json.dumps(self.history),
        }
        with atomic_output(path, overwrite=True) as tmp:
            torch.save(payload, tmp)

    def load(self, path: Path, rank: int) -> None:
        """Continue from a checkpoint exactly where it stopped."""
        ckpt = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.history = json.loads(ckpt.get("history", "[]"))
        rngs = ckpt["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0], self.np_rng, self.aug_gen, self.device)
