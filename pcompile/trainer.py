"""A plain training loop around a compiled model: deterministic data by step, checkpoints
every N steps, and resume from the latest checkpoint (what `pcompile run` and torchrun
restarts rely on)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

import pcompile
from pcompile import checkpoint


@dataclass(frozen=True)
class StepLog:
    step: int
    loss: float
    seconds: float
    samples: int


def train(model: torch.nn.Module, batch_at: Callable[[int], tuple], plan: pcompile.Plan | None, steps: int, *,
          cluster: pcompile.Cluster | None = None, checkpoint_dir: str | None = None, save_every: int = 0,
          lr: float = 1e-3, on_step: Callable[[StepLog], None] | None = None,
          mixed_precision: str | None = None) -> list[StepLog]:
    """Train `steps` steps of AdamW; batch `batch_at(step)` must depend on the step only, so a
    resumed run sees the same data as an uninterrupted one. Returns this run's step logs.
    With mixed_precision="bf16" AdamW steps the fp32 masters (cm.parameters()) and checkpoints
    hold them, so a run may resume with or without mixed precision."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    cluster = cluster or pcompile.Cluster.local(world)
    cm = pcompile.compile(model, cluster, batch_at(0), plan=plan, mixed_precision=mixed_precision)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=lr)
    start = 0
    if checkpoint_dir and os.path.exists(os.path.join(checkpoint_dir, checkpoint.LATEST)):
        start = checkpoint.load(cm, checkpoint_dir, optimizer)
    logs = []
    for step in range(start, steps):
        batch = batch_at(step)
        began = time.perf_counter()
        loss = cm.train_step(*batch)
        optimizer.step()
        optimizer.zero_grad()
        log = StepLog(step, loss.item(), time.perf_counter() - began, int(batch[0].shape[0]))
        logs.append(log)
        if on_step is not None:
            on_step(log)
        if checkpoint_dir and save_every and (step + 1) % save_every == 0:
            checkpoint.save(cm, checkpoint_dir, optimizer, step=step + 1)
    return logs


def append_json_line(path: str, record: dict) -> None:
    """Append one JSON record (rank 0 logs; a restarted run appends after the first run's lines)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
