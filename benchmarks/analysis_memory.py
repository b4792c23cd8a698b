"""Analyse a 7B-parameter GPT on fake tensors and report time and process peak RSS.

The model is built on the meta device (no weights allocated) and planned for 8 A100-80GB with
a batch of 8 x 2048 tokens: every analysis pass (shapes, FLOPs, memory, layers) and the search
run, so the figure is what planning a 7B model costs on a laptop. Prints a human summary and
ends with one `key=value` line for scripts (tests/test_large_config.py reads it).

  python benchmarks/analysis_memory.py [--config gpt-7b] [--batch 8] [--cluster 8xA100-80GB]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

import pcompile
from pcompile.models import GPT, GPT_CONFIGS, count_parameters


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="gpt-7b", choices=sorted(GPT_CONFIGS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cluster", default="8xA100-80GB")
    args = parser.parse_args(argv)

    cfg = GPT_CONFIGS[args.config]
    with torch.device("meta"):
        model = GPT(cfg)
    # Token ids on the meta device too: the analysis reads shapes and dtypes only.
    x = torch.empty(args.batch, cfg.seq_len, dtype=torch.long, device="meta")
    y = torch.empty(args.batch, cfg.seq_len, dtype=torch.long, device="meta")
    start = time.perf_counter()
    plan = pcompile.plan(model, pcompile.Cluster.preset(args.cluster), (x, y))
    elapsed = time.perf_counter() - start
    figures = {"params_b": count_parameters(model) / 1e9, "analyse_s": elapsed,
               "peak_rss_gb": peak_rss_bytes() / 2**30}
    print(f"{args.config}: {cfg.num_layers} layers, hidden {cfg.hidden}, {figures['params_b']:.2f}B parameters, "
          f"batch {args.batch} x {cfg.seq_len} on {args.cluster}")
    print(plan)
    print(f"analysis + search: {elapsed:.2f} s, process peak RSS {figures['peak_rss_gb']:.3f} GiB")
    print(" ".join(f"{k}={v:.3g}" for k, v in figures.items()))
    return figures


if __name__ == "__main__":
    main()
