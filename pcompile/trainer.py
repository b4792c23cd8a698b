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
    grad_norm: float | None = None  # before clipping
    eval_loss: float | None = None


def train(model: torch.nn.Module, batch_at: Callable[..., tuple], plan: pcompile.Plan | None, steps: int, *,
          cluster: pcompile.Cluster | None = None, checkpoint_dir: str | None = None, save_every: int = 0,
          lr: float = 1e-3, on_step: Callable[[StepLog], None] | None = None,
          mixed_precision: str | None = None, clip: float = 1.0, eval_every: int = 0,
          eval_batch_at: Callable[..., tuple] | None = None, local: bool = False,
          rebalance_every: int = 0) -> list[StepLog]:
    """Train `steps` steps of AdamW, the gradients clipped to a global norm of `clip` (0: off) as
    Megatron and the Hugging Face Trainer do by default; batch `batch_at(step)` must depend on the
    step only, so a resumed run sees the same data as an uninterrupted one. With `local=True` the
    data is loaded rank-locally: `batch_at(step, rank, world)` returns part `rank` of `world` of
    step's global batch (the trainer passes cm.data_rank, cm.data_world; `batch_at(0, 0, 1)`, the
    whole first batch, is what the model is captured with). Every `eval_every` steps the loss of
    `eval_batch_at(step)` (same convention) is evaluated with cm.eval_step. Returns this run's
    step logs. With mixed_precision="bf16" AdamW steps the fp32 masters (cm.parameters()) and
    checkpoints hold them, so a run may resume with or without mixed precision. With
    `rebalance_every` N > 0 (plans with expert parallelism) the experts are re-placed and
    replicated by their measured token load every N steps (cm.rebalance: FlexMoE)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    cluster = cluster or pcompile.Cluster.local(world)
    example = batch_at(0, 0, 1) if local else batch_at(0)
    cm = pcompile.compile(model, cluster, example, plan=plan, mixed_precision=mixed_precision)
    if rebalance_every:
        from pcompile.backends import expert_rebalance

        expert_rebalance.check_plan(cm.plan, rebalance_every)
        expert_rebalance.check(cm)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=lr)

    def load(fn, step: int) -> tuple:
        return fn(step, cm.data_rank, cm.data_world) if local else fn(step)

    start = 0
    if checkpoint_dir and os.path.exists(os.path.join(checkpoint_dir, checkpoint.LATEST)):
        start = checkpoint.load(cm, checkpoint_dir, optimizer)
    logs = []
    for step in range(start, steps):
        batch = load(batch_at, step)
        began = time.perf_counter()
        loss = cm.train_step(*batch, local=local)
        norm = torch.nn.utils.clip_grad_norm_(cm.parameters(), clip).item() if clip else None
        optimizer.step()
        optimizer.zero_grad()
        if rebalance_every and (step + 1) % rebalance_every == 0:
            cm.rebalance(optimizer)
        evaluated = None
        if eval_every and eval_batch_at is not None and (step + 1) % eval_every == 0:
            evaluated = cm.eval_step(*load(eval_batch_at, step), local=local).item()
        samples = int(batch[0].shape[0]) * (cm.data_world if local else 1)
        log = StepLog(step, loss.item(), time.perf_counter() - began, samples, norm, evaluated)
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
