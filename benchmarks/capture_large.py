"""Capture and analyse HuggingFace Llama-2-7B, Llama-2-70B and GPT-3 175B configs without weights.

Each model is built on the meta device from its published config (HF LlamaConfig / GPT2Config,
random init skipped: nothing is allocated or downloaded) behind the usual loss wrapper, then
`pcompile.plan(model, Cluster.preset(...), (ids, labels))` runs the whole front end and analysis:
torch.fx is tried and fails on the HF code, torch.export captures it on fake tensors, then the
shape, FLOP, memory and layer passes and the search. Each config runs in its own process so its
peak RSS is its own. Prints one line per config and ends with one `key=value` line:

  llama7b_s=.. llama70b_s=.. gpt3_s=.. peak_rss_gb=..

  python benchmarks/capture_large.py [--only llama7b] [--batch 8] [--seq 2048]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time

CONFIGS = {
    # name: (family, config kwargs, cluster preset)
    "llama7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
                "8xA100-80GB"),
    "llama70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
                 "128x8xA100-80GB"),
    "gpt3": ("gpt2", dict(n_embd=12288, n_layer=96, n_head=96, n_positions=2048, vocab_size=50257),
             "128x8xA100-80GB"),
}


def peak_rss_gb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024) / 2**30


def build(family: str, kwargs: dict):
    import torch
    import transformers

    class CausalLM(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids, labels):
            return self.model(input_ids=ids, labels=labels, use_cache=False, return_dict=False)[0]

    if family == "llama":
        cfg, cls = transformers.LlamaConfig(**kwargs), transformers.LlamaForCausalLM
    else:
        cfg, cls = transformers.GPT2Config(**kwargs), transformers.GPT2LMHeadModel
    with torch.device("meta"):
        return CausalLM(cls(cfg))


def run_one(name: str, batch: int, seq: int, queue) -> None:
    """Front end + analysis passes (timed: the headline), then the search on their IR."""
    import torch

    import pcompile
    from pcompile.api import PLAN_PIPELINE
    from pcompile.passmanager import PassContext, PassManager

    family, kwargs, preset = CONFIGS[name]
    model = build(family, kwargs)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.empty(batch, seq, dtype=torch.long, device="meta")
    ctx = PassContext(model=model, cluster=pcompile.Cluster.preset(preset), example_inputs=(ids, ids))
    start = time.perf_counter()
    analysis = PassManager(PLAN_PIPELINE[:PLAN_PIPELINE.index("search")])
    ir = analysis.run(None, ctx)
    elapsed = time.perf_counter() - start
    trace_s = dict(analysis.timings)["trace"]
    start = time.perf_counter()
    try:
        PassManager(["search"]).run(ir, ctx)
        outcome = f"{preset}: plan {ctx.plan.default.describe()}"
    except pcompile.PcompileError as exc:  # the analysis ran; the search found no fitting plan
        outcome = f"{preset}: no plan: {exc.cause[:100]}"
    except Exception as exc:  # the search is not what this benchmark measures: report, keep the figures
        outcome = f"{preset}: search failed: {type(exc).__name__}: {str(exc)[:100]}"
    search_s = time.perf_counter() - start
    queue.put((name, params, elapsed, search_s, peak_rss_gb(), outcome, ir.summary().splitlines()[0], trace_s))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args(argv)
    context = mp.get_context("spawn")
    figures: dict[str, float] = {}
    peak = 0.0
    for name in args.only or list(CONFIGS):
        queue = context.SimpleQueue()
        process = context.Process(target=run_one, args=(name, args.batch, args.seq, queue))
        process.start()
        process.join()
        if process.exitcode != 0 or queue.empty():
            raise SystemExit(f"{name}: the capture process failed (exit code {process.exitcode})")
        _, params, elapsed, search_s, rss, outcome, summary, trace_s = queue.get()
        print(f"{name:<9} {params / 1e9:6.1f}B params  capture+analysis {elapsed:6.1f} s (capture {trace_s:.1f})  search {search_s:5.1f} s  "
              f"peak RSS {rss:.2f} GB  [{summary}] ({outcome})", flush=True)
        figures[f"{name}_s"] = round(elapsed, 1)
        peak = max(peak, rss)
    figures["peak_rss_gb"] = round(peak, 2)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return figures


if __name__ == "__main__":
    main()
