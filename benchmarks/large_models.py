"""Shared by the large-model benchmarks (search_time.py, capture_large.py): published configs of
BERT-Large, Llama-2-7B / 70B and GPT-3 175B, built as HuggingFace models on the meta device
(random init skipped: nothing allocated or downloaded), with their published training batches,
and the two timed halves of `pcompile.plan`: the analysis passes (capture, shapes, FLOPs,
memory, layers) and the search pass on the IR they annotate.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Workload:
    label: str
    family: str  # "bert", "llama" or "gpt2": which transformers classes build it
    config: dict  # HF config kwargs
    depth_key: str  # the config field holding the number of blocks (for reduced runs)
    batch: int  # global batch (sequences) of the published training run
    seq: int
    cluster: str  # pcompile.Cluster preset


# Batches: BERT 256 x 512 (BERT paper, its seq-512 phase); Llama-2 4M tokens = 1024 x 4096
# (Llama-2 paper, every size); GPT-3 175B 3.2M tokens = 1536 x 2048 (GPT-3 paper, Table 2.1).
WORKLOADS = {
    "bert-large": Workload("BERT-Large", "bert", dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, vocab_size=30522,
        max_position_embeddings=512), "num_hidden_layers", 256, 512, "8xA100-80GB"),
    "llama2-7b": Workload("Llama-2-7B", "llama", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096), "num_hidden_layers",
        1024, 4096, "2x8xA100-80GB"),
    "llama2-70b": Workload("Llama-2-70B", "llama", dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096), "num_hidden_layers",
        1024, 4096, "128x8xA100-80GB"),
    "gpt3-175b": Workload("GPT-3 175B", "gpt2", dict(
        n_embd=12288, n_layer=96, n_head=96, n_positions=2048, vocab_size=50257), "n_layer",
        1536, 2048, "128x8xA100-80GB"),
}


def peak_rss_gb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024) / 2**30


class _WithLoss(torch.nn.Module):
    """HF model -> forward(ids, labels) returning the training loss, as pcompile expects."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, labels):
        return self.model(input_ids=ids, labels=labels, return_dict=False)[0]


def build(w: Workload, layers: int | None = None, batch: int | None = None):
    """(model, (ids, labels)) on the meta device; `layers` overrides the depth (reduced runs)."""
    import transformers

    config = dict(w.config, **({w.depth_key: layers} if layers else {}))
    cfg, cls = {"bert": (transformers.BertConfig, transformers.BertForMaskedLM),
                "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel)}[w.family]
    with torch.device("meta"):
        model = _WithLoss(cls(cfg(**config)))
    ids = torch.empty(batch or w.batch, w.seq, dtype=torch.long, device="meta")
    return model, (ids, ids)


@dataclass
class Analysed:
    ir: object
    ctx: object
    seconds: float  # wall time of the analysis passes
    cpu_seconds: float  # process CPU time of the same (meaningful on a loaded machine)
    timings: list  # (pass, wall seconds)


def analyse(model, inputs, cluster) -> Analysed:
    """The passes `pcompile.plan` runs before the search, with its context and its checks."""
    from pcompile.api import PLAN_PIPELINE, _context, _run
    from pcompile.ir.pass_manager import PassManager
    from pcompile.options import CompileOptions

    start, cpu = time.perf_counter(), time.process_time()
    ctx = _context(model, cluster, inputs, None, CompileOptions())
    manager = PassManager(PLAN_PIPELINE, stop_after="layers")
    ir = _run(manager, ctx)
    return Analysed(ir, ctx, time.perf_counter() - start, time.process_time() - cpu, list(manager.timings))


def timed_search(a: Analysed) -> tuple[float, float]:
    """(wall, CPU) seconds of the search pass alone on the analysed IR, on one torch thread.
    Leaves the plan in a.ctx.plan and the SearchResult in a.ctx.search_result."""
    from pcompile.ir.pass_manager import get_pass

    search = get_pass("search").fn
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        search(a.ir, a.ctx)
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        torch.set_num_threads(threads)


def plan_summary(plan, result) -> str:
    """One line: the plan's shape, its predicted step and peak memory, and its gain per baseline."""
    counts: dict[str, int] = {}
    for assignment in plan.layers:
        name = assignment.strategy.describe()
        counts[name] = counts.get(name, 0) + 1
    layers = ", ".join(f"{n} x{c}" for n, c in counts.items())
    gains = " ".join(f"{b.name}=x{result.gain(b.name):.2f}" if b.fits else f"{b.name}=OOM" for b in result.baselines)
    return (f"{result.setting.describe()}, micro-batch {result.microbatch_size}, layers: {layers}; predicted step "
            f"{result.step_time:.3f} s, peak {result.peak_memory / 2**30:.1f} GiB; searched "
            f"{result.settings_searched}/{result.settings_total} settings; vs baselines {gains}")
