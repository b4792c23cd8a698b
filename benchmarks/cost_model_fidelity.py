"""Cost-model fidelity: predicted vs measured step time and peak memory on Cluster.local(4).

1. Profile this machine with 4 gloo ranks (pcompile.profile.profile_cluster) -> a Cluster.
2. For each plan (GPT and MLPModel of several sizes and batches, x (dp, tp) in {(4,1), (2,2),
   (1,4)}): compile, train with AdamW, time `train_step` (forward + backward + gradient sync;
   median over steps of the slowest rank, after warm-up) and record the peak memory per rank
   by tensor accounting (MemTracker over a whole step, optimizer step included).
3. Predict each with `pcompile.cost.estimate_uniform` on the profiled cluster (the runtime
   syncs gradients after backward, one all-reduce per parameter: overlap_grad_sync=False,
   bucket_bytes=None) and print predicted vs measured, the mean absolute % error of step
   times, the Spearman rank correlation of step times and the mean / worst % error of peak memory.

Run: python benchmarks/cost_model_fidelity.py [--quick-profile] [--profile PATH] [--steps N]
The last line holds the headline figures as key=value pairs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

import pcompile
from pcompile.cost import CostOptions, estimate_uniform
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from pcompile.plan import Strategy

WORLD = 4
MODELS = {
    "gpt-h64-b8": ("gpt", dict(hidden=64, num_heads=4, num_layers=2, seq_len=32), 8),
    "gpt-h128-b16": ("gpt", dict(hidden=128, num_heads=4, num_layers=2, seq_len=64), 16),
    "gpt-h256-b8": ("gpt", dict(hidden=256, num_heads=8, num_layers=2, seq_len=64, vocab_size=512), 8),
    "gpt-h256-b32": ("gpt", dict(hidden=256, num_heads=8, num_layers=2, seq_len=64, vocab_size=512), 32),
    "mlp-w256-b64": ("mlp", dict(width=256, hidden=1024, num_layers=4, num_classes=16), 64),
    "mlp-w512-b512": ("mlp", dict(width=512, hidden=2048, num_layers=2, num_classes=16), 512),
}
SPLITS = ((4, 1), (2, 2), (1, 4))


def build(name: str):
    kind, config, batch = MODELS[name]
    torch.manual_seed(0)
    if kind == "gpt":
        cfg = GPTConfig(**config)
        return GPT(cfg), gpt_inputs(cfg, batch)
    cfg = MLPConfig(**config)
    return MLPModel(cfg), mlp_inputs(cfg, batch)


def measure(plans: list[tuple[str, int, int]], warmup: int, steps: int) -> list[dict]:
    """On every rank: per plan, this rank's step times and peak bytes."""
    from torch.distributed._tools.mem_tracker import MemTracker

    out = []
    for name, dp, tp in plans:
        model, (x, y) = build(name)
        cm = pcompile.compile(model, pcompile.Cluster.local(WORLD), (x, y), plan=pcompile.Plan.uniform(dp=dp, tp=tp))
        optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-3)

        def step():
            cm.train_step(x, y)
            optimizer.step()
            optimizer.zero_grad()

        for _ in range(warmup):
            step()
        times = []
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            cm.train_step(x, y)
            times.append(time.perf_counter() - start)
            optimizer.step()
            optimizer.zero_grad()
        tracker = MemTracker()
        tracker.track_external(cm.gm, optimizer)
        with tracker:
            step()
            tracker.reset_mod_stats()
            step()
        snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
        out.append({"plan": (name, dp, tp), "times": times, "peak": snapshot["Total"],
                    "breakdown": {str(k): v for k, v in snapshot.items()}})
        del cm, optimizer, model
    return out


def predict(cluster: pcompile.Cluster, name: str, dp: int, tp: int):
    model, inputs = build(name)
    ir = pcompile.compile(model, cluster, inputs, plan=pcompile.Plan.uniform(dp=dp, tp=tp), stop_after="layers")
    options = CostOptions(overlap_grad_sync=False, bucket_bytes=None)
    return estimate_uniform(ir, cluster, Strategy(dp=dp, tp=tp), options=options)


def spearman(a, b) -> float:
    ra, rb = (np.argsort(np.argsort(v)).astype(float) for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="load this cluster profile instead of profiling")
    parser.add_argument("--quick-profile", action="store_true", help="the < 30 s profile")
    parser.add_argument("--save-profile", default=os.path.join(tempfile.gettempdir(), "pcompile_cluster_profile.json"),
                        help="where to write the measured profile")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.profile:
        cluster = pcompile.Cluster.from_profile(args.profile)
    else:
        from pcompile.profile import profile_cluster

        cluster = profile_cluster(WORLD, args.save_profile, quick=args.quick_profile)
    device = cluster.device_of(0)
    print(f"profiled in {time.perf_counter() - start:.1f} s: peak {device.peak_flops / 1e9:.1f} GFLOP/s, "
          f"{device.memory_bandwidth / 1e9:.2f} GB/s, op overhead {device.op_overhead * 1e6:.1f} / "
          f"{device.backward_overhead * 1e6:.1f} us, overlap {cluster.overlap:.2f}")
    plans = [(name, dp, tp) for name in MODELS for dp, tp in SPLITS]
    ranks = pcompile.launch(measure, WORLD, plans, args.warmup, args.steps, timeout=3000.0)
    rows = []
    print(f"{'plan':<24} {'pred ms':>9} {'meas ms':>9} {'err %':>7} {'pred MB':>9} {'meas MB':>9} {'err %':>7}")
    for i, (name, dp, tp) in enumerate(plans):
        per_step = [max(r[i]["times"][k] for r in ranks) for k in range(args.steps)]
        measured_time = statistics.median(per_step)
        measured_peak = max(r[i]["peak"] for r in ranks)
        estimate = predict(cluster, name, dp, tp)
        t_err = 100 * (estimate.step_time - measured_time) / measured_time
        m_err = 100 * (estimate.peak_memory - measured_peak) / measured_peak
        rows.append((estimate.step_time, measured_time, t_err, m_err))
        print(f"{name + f' dp{dp}·tp{tp}':<24} {estimate.step_time * 1e3:9.2f} {measured_time * 1e3:9.2f} "
              f"{t_err:7.1f} {estimate.peak_memory / 2**20:9.2f} {measured_peak / 2**20:9.2f} {m_err:7.1f}")
    predicted, measured, t_errs, m_errs = (np.array(c) for c in zip(*rows))
    rho = spearman(predicted, measured)
    print(f"spearman={rho:.3f} time_mape_pct={np.mean(np.abs(t_errs)):.1f} "
          f"mem_err_pct={np.mean(np.abs(m_errs)):.1f} mem_err_max_pct={np.max(np.abs(m_errs)):.1f} "
          f"plans={len(plans)} seconds={time.perf_counter() - start:.0f}")


if __name__ == "__main__":
    sys.exit(main())
