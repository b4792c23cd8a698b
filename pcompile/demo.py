"""`pcompile demo`: plan a small GPT for 4 local ranks, train it in parallel, compare with serial."""
from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist

import pcompile
from pcompile.models import GPT, GPTConfig, gpt_inputs

CONFIG = GPTConfig(vocab_size=256, seq_len=32, hidden=64, num_heads=4, num_layers=2)
BATCH = 8
STEPS = 5


def _train(plan: pcompile.Plan) -> list[float]:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    cm = pcompile.compile(model, pcompile.Cluster.local(dist.get_world_size()), gpt_inputs(CONFIG, BATCH), plan=plan)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    losses = []
    for step in range(STEPS):
        loss = cm.train_step(*gpt_inputs(CONFIG, BATCH, seed=step))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _serial() -> list[float]:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(STEPS):
        loss = model(*gpt_inputs(CONFIG, BATCH, seed=step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main(world_size: int = 4) -> int:
    start = time.perf_counter()
    torch.manual_seed(0)
    model = GPT(CONFIG)
    cluster = pcompile.Cluster.local(world_size)
    ir = pcompile.compile(copy.deepcopy(model), cluster, gpt_inputs(CONFIG, BATCH), stop_after="layers")
    plan = pcompile.plan(model, cluster, gpt_inputs(CONFIG, BATCH))
    print(f"pcompile demo: GPT {CONFIG.num_layers} layers, hidden {CONFIG.hidden}, {CONFIG.num_heads} heads, "
          f"batch {BATCH}x{CONFIG.seq_len}, on {cluster.name}\n")
    print(ir.summary(), "\n")
    print(plan, "\n")
    forced = pcompile.Plan.uniform(dp=2, tp=2)
    rows = []
    for shown, chosen in ((plan, "searched"), (forced, "forced dp2·tp2")):
        parallel = pcompile.launch(_train, world_size, shown)[0]
        rows.append((chosen, shown.default.describe() + (f"·pp{shown.pp}" if shown.pp > 1 else ""), parallel))
    serial = _serial()
    print(f"{'step':<6}{'serial':>12}" + "".join(f"{name + ' ' + desc:>28}" for name, desc, _ in rows))
    worst = 0.0
    for step in range(STEPS):
        line = f"{step:<6}{serial[step]:>12.6f}"
        for _, _, losses in rows:
            line += f"{losses[step]:>28.6f}"
            worst = max(worst, abs(losses[step] - serial[step]))
        print(line)
    elapsed = time.perf_counter() - start
    print(f"\nmax |parallel - serial| loss difference: {worst:.2e} ({'match' if worst < 1e-5 else 'MISMATCH'})")
    print(f"demo_seconds={elapsed:.1f} max_loss_diff={worst:.2e}")
    return 0 if worst < 1e-5 else 1
