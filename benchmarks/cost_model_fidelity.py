"""Cost-model fidelity: predicted vs measured step time and peak memory on Cluster.local(4).

1. Profile this machine with 4 gloo ranks (pcompile.cost.profile.profile_cluster) -> a Cluster.
2. The plans: every (dp, tp) in {(4,1), (2,2), (1,4)} for GPT and MLPModel of several sizes and
   batches, and the other strategies on a 4-block GPT and MLP: ZeRO-3 (sdp), ZeRO-3 with
   operator split, activation checkpointing (with dp and with tp), sequence parallelism, and
   pipelines found by the search narrowed to pp2 (1F1B, and interleaved 1F1B with 2 chunks
   per rank for the GPT).
3. For each: compile, train with AdamW, time `train_step` (forward + backward + gradient sync;
   median over steps of the slowest rank, after warm-up) and record the peak memory per rank
   by tensor accounting (MemTracker over a whole step, optimizer step included).
4. Predict each on the profiled cluster. pp = 1 plans: `pcompile.cost.pricing.estimate_uniform` with
   the runtime's gradient sync (CostOptions.runtime(): after backward, in 25 MiB buckets), as
   the search costs plans. Pipelines: the estimate the search wrote into the plan (its
   objective over the stages' cost tables, pcompile.search.space.evaluate). Print predicted
   vs measured, the mean absolute % error of step times, the Spearman rank correlation of
   step times and the mean / worst % error of peak memory.

With `--latency L`: a slow network. Every transfer is made to take at least L ms from its
issue (pcompile.runtime.latency.inject: a sleep, no CPU), so what the runtime overlaps with
compute hides and what it waits for shows; the plans are LATENCY_CASES (dp, ZeRO-3, ZeRO-3 with
split, ZeRO-2, tp, sp, checkpointing, pipelines with 1F1B and GPipe) on the 4-block GPT, each priced by
`pcompile.cost.plan_price.price` (the search's price) on the profiled cluster with
`with_min_transfer(L)`: a transfer's own work (gloo's, sharing the cores) overlaps compute at the
profiled efficiency eta, the injected wait beyond it hides wholly (it uses no CPU; pricing._exposed).

Run: python benchmarks/cost_model_fidelity.py [--quick-profile] [--profile PATH] [--steps N] [--only a,b]
[--latency L] (`--only` keeps the plans whose label contains one of the comma-separated words, e.g.
`--only sdp,ckpt,pp2`). The last line holds the headline figures as key=value pairs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import pcompile
from pcompile.cost.plan_price import price
from pcompile.cost.pricing import CostOptions, estimate_uniform
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from pcompile.plan import Plan
from pcompile.runtime import latency

WORLD = 4
GPT4 = dict(hidden=256, num_heads=8, num_layers=4, seq_len=64, vocab_size=512)
MODELS = {
    "gpt-h64-b8": ("gpt", dict(hidden=64, num_heads=4, num_layers=2, seq_len=32), 8),
    "gpt-h128-b16": ("gpt", dict(hidden=128, num_heads=4, num_layers=2, seq_len=64), 16),
    "gpt-h256-b8": ("gpt", dict(hidden=256, num_heads=8, num_layers=2, seq_len=64, vocab_size=512), 8),
    "gpt-h256-b32": ("gpt", dict(hidden=256, num_heads=8, num_layers=2, seq_len=64, vocab_size=512), 32),
    "mlp-w256-b64": ("mlp", dict(width=256, hidden=1024, num_layers=4, num_classes=16), 64),
    "mlp-w512-b512": ("mlp", dict(width=512, hidden=2048, num_layers=2, num_classes=16), 512),
    "gpt4-h256-b32": ("gpt", GPT4, 32),
    "mlp4-w512-b256": ("mlp", dict(width=512, hidden=2048, num_layers=4, num_classes=16), 256),
}
SPLITS = ((4, 1), (2, 2), (1, 4))  # (dp, tp) of the uniform plans, for the first six models
UNIFORM = tuple(m for m in MODELS if not m.startswith(("gpt4", "mlp4")))
# (model, label, Strategy fields of a pp = 1 plan) or (model, label, the search space narrowed to a
# pipeline; the search may pick tp2 inside the stages)
PIPE = dict(pp_degrees=(2,), sdp=(False,), checkpoint=(False,), splits=(1,))
FEATURES = (
    ("gpt4-h256-b32", "sdp4", dict(dp=4, sdp=True)),
    ("gpt4-h256-b32", "sdp4·split2", dict(dp=4, sdp=True, split=2)),
    ("gpt4-h256-b32", "dp4·ckpt", dict(dp=4, checkpoint=True)),
    ("gpt4-h256-b32", "dp2·tp2·ckpt", dict(dp=2, tp=2, checkpoint=True)),
    ("gpt4-h256-b32", "dp2·tp2·sp", dict(dp=2, tp=2, sp=True)),
    ("gpt4-h256-b32", "pp2 1F1B", dict(PIPE, schedules=("1F1B",))),
    ("gpt4-h256-b32", "pp2 interleaved", dict(PIPE, schedules=("Interleaved1F1B",))),
    ("mlp4-w512-b256", "sdp4·split2", dict(dp=4, sdp=True, split=2)),
    ("mlp4-w512-b256", "dp4·ckpt", dict(dp=4, checkpoint=True)),
    ("mlp4-w512-b256", "pp2 1F1B", dict(PIPE, schedules=("1F1B",))),
)


def _pipeline(schedule: str, microbatches: int, **strategy) -> Plan:
    return dataclasses.replace(Plan.uniform(pp=2, **strategy), schedule=schedule, num_microbatches=microbatches)


# (label, plan) on gpt4-h256-b32 under injected latency: every kind of communication the runtime
# overlaps (dp buckets, ZeRO-3 prefetch and reduce-scatters, pipeline sends) or waits for (tp, sp)
LATENCY_CASES = (
    ("dp4", Plan.uniform(dp=4)),
    ("sdp4", Plan.uniform(dp=4, sdp=True)),
    ("sdp4·split2", Plan.uniform(dp=4, sdp=True, split=2)),
    ("z2dp4", Plan.uniform(dp=4, zero2=True)),
    ("dp2·tp2", Plan.uniform(dp=2, tp=2)),
    ("dp1·tp4", Plan.uniform(tp=4)),
    ("dp2·tp2·sp", Plan.uniform(dp=2, tp=2, sp=True)),
    ("dp4·ckpt", Plan.uniform(dp=4, checkpoint=True)),
    ("pp2·dp2 1F1B m4", _pipeline("1F1B", 4, dp=2)),
    ("pp2·dp2 GPipe m2", _pipeline("GPipe", 2, dp=2)),
    ("pp2·tp2 1F1B m2", _pipeline("1F1B", 2, tp=2)),
)


@dataclass(frozen=True)
class Case:
    label: str
    model: str
    plan: Plan
    searched: bool  # the plan (and its estimate) came from the narrowed search


def build(name: str):
    kind, config, batch = MODELS[name]
    torch.manual_seed(0)
    if kind == "gpt":
        cfg = GPTConfig(**config)
        return GPT(cfg), gpt_inputs(cfg, batch)
    cfg = MLPConfig(**config)
    return MLPModel(cfg), mlp_inputs(cfg, batch)


def cases(cluster: pcompile.Cluster) -> list[Case]:
    """Every plan; the pipelines are searched on the profiled cluster (their estimate is the search's)."""
    out = [Case(f"{name} dp{dp}·tp{tp}", name, Plan.uniform(dp=dp, tp=tp), False)
           for name in UNIFORM for dp, tp in SPLITS]
    for name, label, how in FEATURES:
        if "pp_degrees" not in how:
            out.append(Case(f"{name} {label}", name, Plan.uniform(**how), False))
            continue
        model, inputs = build(name)
        plan = pcompile.plan(model, cluster, inputs, search_space=how)
        shape = f"pp{plan.pp} m{plan.num_microbatches} {plan.schedule}" + (
            f"(v={plan.virtual_stages})" if plan.virtual_stages > 1 else "")
        out.append(Case(f"{name} {plan.default.describe()} {shape}", name, plan, True))
    return out


def _tracker():
    """MemTracker counting every tensor storage of the step, without its per-module bookkeeping:
    a pipeline stage's module runs once per micro-batch in one step (MemTracker refuses repeated
    calls) and the ZeRO-3 rewrite puts non-leaf gathered weights in its modules (torch refuses
    the gradient hooks MemTracker installs there). Those hooks only attribute memory to modules
    and label gradients; the process-wide peak, which this benchmark reads, counts every
    storage created under the tracker's dispatch mode plus the tracked modules and optimizer."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _pre_fw_hook(self, module, inputs):
            pass

        def _post_fw_hook(self, module, inputs, outputs):
            pass

        def _pre_bw_hook(self, module, args):
            pass

        def _post_bw_hook(self, module, args):
            pass
    return Tracker()


def latency_cases() -> list[Case]:
    return [Case(f"gpt4-h256-b32 {label}", "gpt4-h256-b32", plan, False) for label, plan in LATENCY_CASES]


def measure(plans: list[tuple[str, Plan]], warmup: int, steps: int, ms: float = 0.0) -> list[dict]:
    """On every rank: per plan, this rank's step times and peak bytes (steps under `ms` of
    injected latency per transfer when ms > 0)."""
    return [_measure_one(name, plan, warmup, steps, ms) for name, plan in plans]


def _measure_one(name: str, plan: Plan, warmup: int, steps: int, ms: float = 0.0) -> dict:
    """One plan (its model, compiled module and optimizer are freed on return)."""
    model, (x, y) = build(name)
    cm = pcompile.compile(model, pcompile.Cluster.local(WORLD), (x, y), plan=plan)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-3)

    def step():
        cm.train_step(x, y)
        optimizer.step()
        optimizer.zero_grad()

    times = []
    with latency.inject(ms) if ms > 0 else _nothing():
        for _ in range(warmup):
            step()
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            cm.train_step(x, y)
            times.append(time.perf_counter() - start)
            optimizer.step()
            optimizer.zero_grad()
    tracker = _tracker()
    # the rank's modules: its graph, or its pipeline stages' graphs
    modules = [cm.gm] if cm._pipeline is None else cm._pipeline.modules
    # and what the optimizer steps: ZeRO-2's chunks are parameters of no module (storages are
    # counted once, so the modules' own parameters listed again change nothing)
    stepped = torch.nn.ParameterList(p for group in optimizer.param_groups for p in group["params"])
    tracker.track_external(*modules, stepped, optimizer)
    with tracker:
        step()
        tracker.reset_mod_stats()
        step()
    snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {"plan": name, "times": times, "peak": snapshot["Total"],
            "breakdown": {str(k): v for k, v in snapshot.items()}}


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def predict(cluster: pcompile.Cluster, case: Case, priced: bool = False):
    """(step seconds, peak bytes) the cost model predicts for the case's plan (`priced`: by
    plan_price.price, the search's price for any plan)."""
    if case.searched:
        return case.plan.estimate.step_time, case.plan.estimate.peak_memory
    model, inputs = build(case.model)
    ir = pcompile.compile(model, cluster, inputs, plan=case.plan, stop_after="layers")
    options = CostOptions.runtime()
    if priced:
        estimate, _ = price(ir, cluster, case.plan, options)
        return estimate.step_time, estimate.peak_memory
    estimate = estimate_uniform(ir, cluster, case.plan.default, options=options)
    return estimate.step_time, estimate.peak_memory


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
    parser.add_argument("--only", help="comma-separated words: keep the plans whose label contains one")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="inject this many ms per transfer and run LATENCY_CASES (see the docstring)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    load = os.getloadavg()[0]  # ranks share the cores with whatever else runs: timings move with it
    if args.profile:
        cluster = pcompile.Cluster.from_profile(args.profile)
    else:
        from pcompile.cost.profile import profile_cluster

        cluster = profile_cluster(WORLD, args.save_profile, quick=args.quick_profile)
    device = cluster.device_of(0)
    print(f"profiled in {time.perf_counter() - start:.1f} s: peak {device.peak_flops / 1e9:.1f} GFLOP/s, "
          f"{device.memory_bandwidth / 1e9:.2f} GB/s, op overhead {device.op_overhead * 1e6:.1f} / "
          f"{device.backward_overhead * 1e6:.1f} us, overlap {cluster.overlap:.2f}")
    chosen = latency_cases() if args.latency else cases(cluster)
    if args.only:
        chosen = [c for c in chosen if any(word in c.label for word in args.only.split(","))]
    if args.latency:
        cluster = cluster.with_min_transfer(args.latency / 1e3)
        print(f"injected latency {args.latency:g} ms per transfer; priced on {cluster.name} (overlap "
              f"{cluster.overlap:.2f} for the transfers' own work, the injected wait hidden wholly)")
    # before the launch: a planning error shows at once
    predictions = [predict(cluster, c, priced=bool(args.latency)) for c in chosen]
    ranks = pcompile.launch(measure, WORLD, [(c.model, c.plan) for c in chosen], args.warmup, args.steps,
                            args.latency, timeout=3000.0)
    rows = []
    width = max(len(c.label) for c in chosen) + 1
    print(f"{'plan':<{width}} {'pred ms':>9} {'meas ms':>9} {'err %':>7} {'pred MB':>9} {'meas MB':>9} {'err %':>7}")
    for i, (case, (step, peak)) in enumerate(zip(chosen, predictions)):
        per_step = [max(r[i]["times"][k] for r in ranks) for k in range(args.steps)]
        measured_time = statistics.median(per_step)
        measured_peak = max(r[i]["peak"] for r in ranks)
        t_err = 100 * (step - measured_time) / measured_time
        m_err = 100 * (peak - measured_peak) / measured_peak
        rows.append((step, measured_time, t_err, m_err))
        print(f"{case.label:<{width}} {step * 1e3:9.2f} {measured_time * 1e3:9.2f} {t_err:7.1f} "
              f"{peak / 2**20:9.2f} {measured_peak / 2**20:9.2f} {m_err:7.1f}"
              + ("  (search)" if case.searched else ""))
    predicted, measured, t_errs, m_errs = (np.array(c) for c in zip(*rows))
    rho = spearman(predicted, measured)
    print(f"spearman={rho:.3f} time_mape_pct={np.mean(np.abs(t_errs)):.1f} "
          f"mem_err_pct={np.mean(np.abs(m_errs)):.1f} mem_err_max_pct={np.max(np.abs(m_errs)):.1f} "
          f"plans={len(chosen)} latency_ms={args.latency:g} seconds={time.perf_counter() - start:.0f} "
          f"load1_start={load:.2f} "
          f"load1_end={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
