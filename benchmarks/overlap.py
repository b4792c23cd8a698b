"""How much injected communication time the runtime hides behind compute, on 4 gloo ranks.

Every torch.distributed transfer is made to take at least L ms from its issue
(pcompile.runtime.latency: a sleep, as a slow link would, no CPU used). For each plan, the
median step time without (t0) and with (tL) the latency, and the transfers a step issues (n):

    hidden % = 100 * (1 - (tL - t0) / (n * L))

n * L is what the step would lose if every transfer waited on its own; tL - t0 is what it
lost. Plans: dp4 (gradient buckets all-reduced during backward), ZeRO-3 over 4 (gathers
prefetched, reduce-scatters asynchronous), pp2·dp2 with 4 micro-batches (1F1B: sends and
receives asynchronous, the dp buckets with the last micro-batch's backward).

What cannot be hidden, by construction: the transfer issued last in a step (the first
layers' gradient bucket, issued when backward ends) and the pipeline's activations on the
critical path of the schedule (a stage waits for its input). Nor latency beyond the compute
there is to hide it behind: ZeRO-3 gathers one unit ahead (as FSDP2), so each gather hides
behind one block's compute (~35 ms forward, ~70 backward here), and a 1F1B stage's send behind
one micro-batch's. Measured 2026-12-07, quiet, 3 steps: at L = 100 ms (longer than a block)
dp_hidden_pct=91.4 sdp_hidden_pct=53.8 pp_hidden_pct=36.9 - ZeRO-3 and the pipeline are then
latency-bound (tL ~ the chain of gathers / sends, not t0 + it); at L = 20 ms (`--ms 20`, shorter
than a block) dp_hidden_pct=93.4 sdp_hidden_pct=104.5 pp_hidden_pct=81.7 (ZeRO-3 over 100: the
step's own time moves by more than what is left exposed).

Usage: python benchmarks/overlap.py [--ms L] [--steps N]. Last line:
dp_hidden_pct=... sdp_hidden_pct=... pp_hidden_pct=... (target >= 80 where the schedule allows it).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pcompile  # noqa: E402
from pcompile import Plan  # noqa: E402
from pcompile.models import GPT, GPTConfig, gpt_inputs  # noqa: E402
from pcompile.runtime import latency  # noqa: E402

CFG = GPTConfig(vocab_size=1024, hidden=384, num_layers=6, seq_len=64)
BATCH = 16
PLANS = {"dp": Plan.uniform(dp=4), "sdp": Plan.uniform(dp=4, sdp=True),
         "pp": dataclasses.replace(Plan.uniform(dp=2, pp=2), num_microbatches=4)}


def rank(plan: Plan, ms: float, steps: int) -> dict:
    torch.manual_seed(0)
    cm = pcompile.compile(GPT(CFG), pcompile.Cluster.local(dist.get_world_size()), gpt_inputs(CFG, BATCH), plan=plan)
    batch = gpt_inputs(CFG, BATCH)

    def step() -> float:
        dist.barrier()
        start = time.perf_counter()
        cm.train_step(*batch)
        for p in cm.parameters():
            p.grad = None
        return time.perf_counter() - start

    step()
    plain = statistics.median(step() for _ in range(steps))
    with latency.inject(ms) as injected:
        step()
        before = injected.calls
        delayed = statistics.median(step() for _ in range(steps))
        calls = (injected.calls - before) / steps
    cm.close()
    return {"t0": plain, "tL": delayed, "calls": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", type=float, default=100.0)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    figures = {}
    print(f"GPT {CFG}, batch {BATCH}, injected latency {args.ms:.0f} ms per transfer\n")
    print(f"{'plan':6} {'t0 ms':>8} {'tL ms':>8} {'transfers':>10} {'injected ms':>12} {'exposed ms':>11} "
          f"{'hidden':>7}")
    for name, plan in PLANS.items():
        per_rank = pcompile.launch(rank, 4, plan, args.ms, args.steps, timeout=1800)
        t0 = max(r["t0"] for r in per_rank)
        tl = max(r["tL"] for r in per_rank)
        calls = max(r["calls"] for r in per_rank)
        injected = calls * args.ms / 1e3
        hidden = 100 * (1 - (tl - t0) / injected) if injected else float("nan")
        print(f"{name:6} {t0 * 1e3:>8.0f} {tl * 1e3:>8.0f} {calls:>10.1f} {injected * 1e3:>12.0f} "
              f"{(tl - t0) * 1e3:>11.0f} {hidden:>6.0f}%")
        figures[f"{name}_hidden_pct"] = round(hidden, 1)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
