"""The pipeline step's loss reaches every pp rank while the schedule drains (backends/loss_relay.py):
the last stage sends it asynchronously once its last micro-batch's loss is computed, with
backwards still to run, and the others post their receive before the schedule starts - not a
broadcast after the step, whose latency nothing would hide. The value is the serial model's."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

import pcompile
from pcompile.models import GPT, GPTConfig, gpt_inputs

CFG = GPTConfig(num_layers=2, hidden=32, num_heads=2, seq_len=16, vocab_size=64)
MICROBATCHES = 4


def _broadcasts() -> dict:
    torch.manual_seed(0)
    model = GPT(CFG)
    serial = GPT(CFG)
    serial.load_state_dict(model.state_dict())
    x, y = gpt_inputs(CFG, 8, 0)
    plan = dataclasses.replace(pcompile.Plan.uniform(pp=2), num_microbatches=MICROBATCHES, schedule="1F1B")
    cm = pcompile.compile(model, pcompile.Cluster.local(2), (x, y), plan=plan)
    stage = cm._pipeline.stages[0]
    done, seen = [0], []
    backward = stage.backward_one_chunk

    def counted(*args, **kwargs):
        out = backward(*args, **kwargs)
        done[0] += 1
        return out
    stage.backward_one_chunk = counted
    original = dist.broadcast

    def recorded(*args, **kwargs):
        seen.append((bool(kwargs.get("async_op")), done[0]))
        return original(*args, **kwargs)
    dist.broadcast = recorded
    try:
        losses = []
        for _ in range(2):  # the first step also runs torch's metadata inference
            done[0], seen[:] = 0, []
            losses.append(cm.train_step(x, y).item())
    finally:
        dist.broadcast = original
    return {"rank": dist.get_rank(), "seen": list(seen), "losses": losses, "serial": serial(x, y).item()}


def test_the_loss_is_sent_during_the_drain_and_is_the_serial_loss():
    for r in pcompile.launch(_broadcasts, 2):
        assert len(r["seen"]) == 1 and r["seen"][0][0], r  # one broadcast a step, asynchronous
        if r["rank"] == 1:  # the last stage: sent with backwards still to run
            assert r["seen"][0][1] < MICROBATCHES, r
        else:  # the receiving side: posted before any backward
            assert r["seen"][0][1] == 0, r
        assert abs(r["losses"][0] - r["serial"]) < 1e-5, r
