"""Capture and analyse HuggingFace Llama-2-7B, Llama-2-70B and GPT-3 175B configs without weights (issue #6).

Each model is built on the meta device from its published config (large_models.py: random
init skipped, nothing allocated or downloaded) behind the usual loss wrapper, with its
published global batch, and `pcompile.plan`'s passes run in two timed halves: capture and
analysis (fx is tried and fails on the HF code, torch.export captures it on fake tensors, then
the shape, FLOP, memory and layer passes), then the search on their IR. Each config runs in
its own process so its peak RSS is its own (target: < 4 GB).

Where the time goes (GPT-3 175B, 96 blocks, 5157 nodes, torch 2.13, transformers 5, 2 cores):
capture + analysis 15.4 s on a quiet machine (peak RSS 0.47 GB), of which the capture is
11.9 s, nearly all inside torch.export (fake-tensor dispatch of the HF code with a symbolic
batch dimension: sympy arithmetic on SymInts, and a stack trace recorded per node), linear in
the blocks; shapes / FLOPs / memory take about 1 s each. Nothing in the benchmark or in
pcompile's passes is quadratic: the 300 s timeouts seen before were a machine shared by many
jobs (wall time 15-25x the process's CPU time). `--profile` prints the analysis's top
functions by CPU time.

  python benchmarks/capture_large.py [--only llama7b] [--layers N] [--no-search] [--profile]

`--layers N` builds every model with N blocks (a reduced check). Last line:
  llama7b_s=.. llama70b_s=.. gpt3_s=.. <name>_search_s=.. peak_rss_gb=..
(<name>_s: capture + analysis wall seconds; <name>_search_s: the search's; peak_rss_gb: the
largest process peak over the configs, search included).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time

CONFIGS = {"llama7b": "llama2-7b", "llama70b": "llama2-70b", "gpt3": "gpt3-175b"}  # key: large_models workload


def _profiled(fn, top: int):
    """fn() under cProfile on process CPU time (wall time is meaningless on a shared machine);
    prints the `top` functions by cumulative CPU time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile(time.process_time)
    result = profiler.runcall(fn)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    print(out.getvalue(), flush=True)
    return result


def run_one(name: str, layers: int | None, search: bool, profile: bool, queue) -> None:
    """In a fresh process: capture + analysis (timed: the headline), then the search on their IR."""
    from large_models import WORKLOADS, analyse, build, peak_rss_gb, plan_summary, timed_search

    import pcompile

    w = WORKLOADS[CONFIGS[name]]
    model, inputs = build(w, layers)
    params = sum(p.numel() for p in model.parameters())
    cluster = pcompile.Cluster.preset(w.cluster)
    analysed = _profiled(lambda: analyse(model, inputs, cluster), 40) if profile else analyse(model, inputs, cluster)
    analysis_rss = peak_rss_gb()
    search_s = float("nan")
    if not search:
        outcome = "not searched"
    else:
        try:
            search_s, _ = timed_search(analysed)
            outcome = "plan " + plan_summary(analysed.ctx.plan, analysed.ctx.search_result)
        except pcompile.PcompileError as exc:  # the analysis ran; the search found no fitting plan
            outcome = f"no plan: {exc.cause[:160]}"
    queue.put(dict(label=w.label, depth=layers or w.config[w.depth_key], batch=w.batch, seq=w.seq, cluster=w.cluster,
                   params=params, seconds=analysed.seconds, cpu=analysed.cpu_seconds, timings=analysed.timings,
                   nodes=len(analysed.ir.graph.nodes), search_s=search_s, analysis_rss=analysis_rss,
                   rss=peak_rss_gb(), outcome=outcome))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--layers", type=int, help="build every model with this many blocks (a reduced check)")
    parser.add_argument("--no-search", action="store_true", help="capture and analyse only")
    parser.add_argument("--profile", action="store_true", help="print the analysis's top functions by CPU time")
    args = parser.parse_args(argv)
    context = mp.get_context("spawn")
    figures: dict[str, float] = {}
    peak, start = 0.0, time.perf_counter()
    for name in args.only or list(CONFIGS):
        queue = context.SimpleQueue()
        process = context.Process(target=run_one, args=(name, args.layers, not args.no_search, args.profile, queue))
        process.start()
        process.join()
        if process.exitcode != 0 or queue.empty():
            raise SystemExit(f"{name}: the capture process failed (exit code {process.exitcode})")
        r = queue.get()
        passes = ", ".join(f"{p} {s:.1f}" for p, s in r["timings"])
        print(f"{r['label']} ({r['params'] / 1e9:.1f}B params, {r['depth']} layers, batch {r['batch']} x {r['seq']}, "
              f"{r['nodes']} nodes) on {r['cluster']}\n"
              f"  capture+analysis {r['seconds']:.1f} s (CPU {r['cpu']:.1f} s; per pass: {passes}), "
              f"peak RSS {r['analysis_rss']:.2f} GB\n"
              f"  search {r['search_s']:.1f} s, process peak RSS {r['rss']:.2f} GB: {r['outcome']}", flush=True)
        figures[f"{name}_s"] = round(r["seconds"], 1)
        figures[f"{name}_search_s"] = round(r["search_s"], 1)
        peak = max(peak, r["rss"])
    figures["peak_rss_gb"] = round(peak, 2)
    print(f"total {time.perf_counter() - start:.0f} s")
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return figures


if __name__ == "__main__":
    sys.exit(main() and 0)
