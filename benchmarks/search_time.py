"""How long the plan search takes on realistic sizes, full space, one core.

Cost tables here are SYNTHETIC: built from layer sizes with simple formulas (Megatron's FLOP and
activation counts, ring collectives on NVLink / InfiniBand figures, mixed-precision Adam states),
not from pcompile's cost model on a traced model; that is wired in by the search pass. The
search itself (space, rules, DPs, certification, baselines, explanation) is the real one.

  python benchmarks/search_time.py          # ends with: bert_s=.. llama7b_s=.. gpt3_s=..
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from pcompile.costtable import CostTable  # noqa: E402
from pcompile.search_engine import SearchProblem, search  # noqa: E402

GB = 2**30
PEAK, NVLINK, IB, LAT = 312e12 * 0.7, 300e9, 25e9, 1e-5


@dataclass(frozen=True)
class Model:
    name: str
    blocks: int
    hidden: int
    heads: int
    seq: int
    vocab: int
    batch: int  # global batch (sequences)
    nodes: int
    per_node: int
    memory: float  # budget per device (bytes)


def ring(kind: str, nbytes: float, n: int, bw: float) -> float:
    if n <= 1:
        return 0.0
    steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
    return steps * LAT + steps / n * nbytes / bw


class SyntheticCosts:
    """cost(query) -> CostTable of one stage (every stage identical: a homogeneous cluster)."""

    def __init__(self, m: Model):
        self.m, self.cache = m, {}

    def __call__(self, q) -> CostTable:
        key = (q.devices_per_stage, q.microbatch_size, q.strategies)
        if key not in self.cache:
            self.cache[key] = self.table(q.devices_per_stage, q.microbatch_size, q.strategies)
        return self.cache[key]

    def layer(self, kind: str, s, mb: int, devices: int) -> tuple[float, ...]:
        m = self.m
        h, seq, n = m.hidden, m.seq, mb // s.dp
        tokens = n * seq
        bw = lambda group: NVLINK if group <= m.per_node else IB  # noqa: E731
        if kind == "block":
            params = 12 * h * h
            flops = 2 * params * tokens / s.tp + 4 * tokens * seq * h / s.tp
            act = tokens * h * (10 + 24 / s.tp + 5 * m.heads * seq / (h * s.tp))
            if s.sp:
                act = tokens * h * 34 / s.tp + 5 * m.heads * seq * seq * n / s.tp
            tp_comm = 4 * ring("all_reduce", tokens * h * 2, s.tp, bw(s.tp))
            largest = tokens * 4 * h * 2 / s.tp
        else:  # "pre" (embedding) or "post" (LM head), vocab-parallel over tp
            params = m.vocab * h
            flops = (2 * params * tokens / s.tp) if kind == "post" else tokens * h
            act = tokens * (m.vocab * 4 / s.tp if kind == "post" else h * 2)
            tp_comm = 2 * ring("all_reduce", tokens * h * 2, s.tp, bw(s.tp))
            largest = tokens * m.vocab * 4 / s.tp if kind == "post" else tokens * h * 2
        rate = PEAK * tokens / (tokens + 2048)  # small GEMMs run below peak
        compute = flops / rate + s.split * 2e-5
        weight = 2 * params / s.tp  # bf16 bytes of this rank's tp shard
        gather = 3 * ring("all_gather", weight, s.dp, bw(s.dp * s.tp)) + s.split * 2 * LAT if s.sdp else 0.0
        fwd = compute + tp_comm / 2 + gather / 3
        bwd = 2 * compute + tp_comm / 2 + 2 * gather / 3 + (fwd if s.checkpoint else 0.0)
        sync = 0.0 if s.sdp else ring("all_reduce", weight, s.dp, bw(s.dp * s.tp))
        state = 16 * params / s.tp / (s.dp if s.sdp else 1)
        kept = tokens * h * 2 / (s.tp if s.sp else 1) if s.checkpoint else act
        temp = largest + (weight / s.split if s.sdp else 0.0) + (act if s.checkpoint else 0.0)
        return fwd, bwd, sync, state, kept, temp

    def table(self, devices: int, mb: int, strategies) -> CostTable:
        m = self.m
        kinds = ["pre"] + ["block"] * m.blocks + ["post"]
        per_kind = {k: np.array([self.layer(k, s, mb, devices) for s in strategies]).T for k in set(kinds)}
        rows = np.stack([per_kind[k] for k in kinds], axis=1)  # [6, L, S]
        layout = np.array([s.dp * (s.tp if s.sp else 1) for s in strategies])
        boundary = mb * m.seq * m.hidden * 2.0
        fine, coarse = np.maximum.outer(layout, layout), np.minimum.outer(layout, layout)
        switch = np.where(fine == coarse, 0.0, 2 * (LAT + boundary / coarse / NVLINK * (1 - coarse / fine)))
        L = len(kinds)
        return CostTable(layers=self.layers(), strategies=strategies, devices_per_stage=devices, microbatch_size=mb,
                         fwd_time=rows[0], bwd_time=rows[1], sync_time=rows[2], state_memory=rows[3],
                         activation_memory=rows[4], temp_memory=rows[5],
                         switch_time=np.broadcast_to(switch, (L - 1,) + switch.shape),
                         boundary_bytes=np.full(L - 1, boundary))

    def layers(self) -> tuple[str, ...]:
        return ("pre",) + tuple(f"blocks.{i}" for i in range(self.m.blocks)) + ("post",)


MODELS = {
    "bert": Model("BERT-Large", 24, 1024, 16, 512, 30522, 256, 1, 8, 16 * GB),
    "llama7b": Model("7B (32 layers)", 32, 4096, 32, 2048, 32000, 512, 2, 8, 64 * GB),
    "gpt3": Model("GPT-3 175B", 96, 12288, 96, 2048, 50257, 1536, 128, 8, 64 * GB),
}


def run(key: str) -> float:
    m = MODELS[key]
    costs = SyntheticCosts(m)
    devices = m.nodes * m.per_node
    problem = SearchProblem(costs.layers(), devices, m.per_node, m.batch, costs, (m.memory,) * devices,
                            p2p_bandwidth=IB if m.nodes > 1 else NVLINK, p2p_latency=LAT)
    start = time.perf_counter()
    result = search(problem)
    seconds = time.perf_counter() - start
    first = result.explain().splitlines()[0]
    gains = " ".join(f"{b.name}=x{result.gain(b.name):.2f}" if b.fits else f"{b.name}=OOM" for b in result.baselines)
    print(f"{m.name:<16} {devices:>5} GPUs  {seconds:7.2f} s  searched {result.settings_searched}/"
          f"{result.settings_total} settings  {first}\n{'':<24}{gains}", flush=True)
    return seconds


def main(argv: list[str]) -> None:
    keys = argv or list(MODELS)
    print("search time on SYNTHETIC cost tables (formulas from layer sizes, not the traced cost model)")
    times = {k: run(k) for k in keys}
    print(" ".join(f"{k}_s={v:.2f}" for k, v in times.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
