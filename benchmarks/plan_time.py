"""How long a user waits for a plan (issue #16): the whole `pcompile.plan` - capture, analyses,
search - of real models on real clusters, and the `pcompile plan` command end to end.

  BERT-Large    8 A100 (8xA100-80GB)           256 x 512
  Llama-2-7B   16 A100 (2x8xA100-80GB)        1024 x 4096
  Llama-2-70B  64 A100 (8 nodes x 8)          1024 x 4096
  GPT-3 175B 1024 A100 (128x8xA100-80GB)      1536 x 2048

Each model is built from its HuggingFace config on the meta device (large_models.py) in a
fresh process, which then times `pcompile.plan(model, cluster, inputs)` alone: wall and CPU
seconds (the process's: meaningful when other jobs share the cores) and the process's peak
RSS (GPT-3's must stay under 2 GB). Then `pcompile plan gpt3-175b --cluster 128x8xA100-80GB`
(the built-in GPT-3 config at its published batch, no other flag) runs as a command: process
start, imports and model building included, its CPU seconds from the child's rusage.

Targets (CPU seconds, 2 cores): gpt3_total_s < 5, llama70b_total_s < 3, cli_gpt3_s < 8.

  python benchmarks/plan_time.py [bert llama7b llama70b gpt3 cli]

Last line (CPU seconds): bert_total_s=.. llama7b_total_s=.. llama70b_total_s=.. gpt3_total_s=.. cli_gpt3_s=..
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# last-line key: (large_models workload, cluster: a preset name or (nodes, devices per node))
MODELS = {"bert": ("bert-large", "8xA100-80GB"), "llama7b": ("llama2-7b", "2x8xA100-80GB"),
          "llama70b": ("llama2-70b", (8, 8)), "gpt3": ("gpt3-175b", "128x8xA100-80GB")}
TARGETS = {"gpt3": 5.0, "llama70b": 3.0, "cli": 8.0}
CLI = ("plan", "gpt3-175b", "--cluster", "128x8xA100-80GB")


def cluster_of(spec):
    import pcompile
    from pcompile.cluster import A100_80GB, NodeGroup

    if isinstance(spec, str):
        return pcompile.Cluster.preset(spec)
    nodes, per_node = spec  # no preset of this size: the 128-node preset's links, fewer nodes
    return dataclasses.replace(pcompile.Cluster.preset("128x8xA100-80GB"), name=f"{nodes}x{per_node}xA100-80GB",
                               node_groups=(NodeGroup(A100_80GB, nodes, per_node),))


def plan_one(key: str, queue) -> None:
    """In a fresh process: build the model, then time pcompile.plan on it."""
    sys.path.insert(0, HERE)
    from large_models import WORKLOADS, build, peak_rss_gb

    import pcompile

    name, spec = MODELS[key]
    w = WORKLOADS[name]
    cluster = cluster_of(spec)
    model, inputs = build(w)
    built = peak_rss_gb()
    start, cpu = time.perf_counter(), time.process_time()
    plan = pcompile.plan(model, cluster, inputs)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    queue.put(dict(label=w.label, cluster=cluster.name, devices=cluster.num_devices, batch=w.batch, seq=w.seq,
                   wall=wall, cpu=cpu, rss=peak_rss_gb(), built_rss=built, reason=plan.reason))


def cli_run() -> dict:
    """`pcompile plan gpt3-175b ...` as a command: wall, the child's CPU seconds and peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pcompile", *CLI], capture_output=True, text=True,
                          cwd=os.path.dirname(HERE))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"pcompile {' '.join(CLI)} failed:\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    predicted = next((line.strip() for line in done.stdout.splitlines() if line.startswith("predicted")), "")
    return dict(wall=wall, cpu=cpu, rss=after.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 2**30,
                predicted=predicted)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", metavar="RUN", help=f"some of {list(MODELS) + ['cli']} (default: all)")
    args = parser.parse_args(argv)
    unknown = [r for r in args.runs if r not in list(MODELS) + ["cli"]]
    if unknown:
        parser.error(f"unknown run(s) {unknown}: choose from {list(MODELS) + ['cli']}")
    chosen = args.runs or list(MODELS) + ["cli"]
    figures: dict[str, float] = {}
    context = mp.get_context("spawn")
    for key in [k for k in MODELS if k in chosen]:
        queue = context.SimpleQueue()
        process = context.Process(target=plan_one, args=(key, queue))
        process.start()
        process.join()
        if process.exitcode != 0 or queue.empty():
            raise SystemExit(f"{key}: the planning process failed (exit code {process.exitcode})")
        r = queue.get()
        target = f" (target < {TARGETS[key]:g} s CPU)" if key in TARGETS else ""
        print(f"{r['label']} ({r['batch']} x {r['seq']}) on {r['cluster']} ({r['devices']} devices): pcompile.plan "
              f"{r['wall']:.2f} s wall, {r['cpu']:.2f} s CPU{target}; peak RSS {r['rss']:.2f} GB "
              f"(model built: {r['built_rss']:.2f} GB)\n  {r['reason']}", flush=True)
        if key == "gpt3":
            print(f"  peak RSS of planning GPT-3 175B on 1024 GPUs: {r['rss']:.2f} GB (must stay under 2 GB)")
        figures[f"{key}_total_s"] = r["cpu"]
    if "cli" in chosen:
        r = cli_run()
        print(f"pcompile {' '.join(CLI)}: {r['wall']:.2f} s wall, {r['cpu']:.2f} s CPU (target < {TARGETS['cli']:g} s; "
              f"process start, imports and model building included), peak RSS {r['rss']:.2f} GB\n  {r['predicted']}")
        figures["cli_gpt3_s"] = r["cpu"]
    print(" ".join(f"{k}={v:.2f}" for k, v in figures.items()))
    return figures


if __name__ == "__main__":
    main()
