"""Rank function for the hypothesis-driven parallel-vs-serial test (module-level so it pickles).

Every rank runs the same `@given` function: with derandomize=True, no example database and
only the generate phase (no shrinking, whose path could differ between ranks), hypothesis
draws the same sequence of examples on every rank, so the collectives inside each example
line up. Examples record their differences instead of asserting, so every rank always runs
every example; the parent test asserts on the records.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import pcompile
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from tests.distributed.ranks import gap


@st.composite
def cases(draw, world: int):
    """(kind, config, dp, tp, batch): tp divides the heads and widths, dp divides the batch.
    Models have >= 2 blocks: a 1-block model gets no block layer and cannot take tp (known bug)."""
    tp = draw(st.sampled_from([t for t in (1, 2, 4) if world % t == 0]))
    dp = world // tp
    batch = dp * draw(st.integers(1, 2))
    layers = draw(st.integers(2, 3))
    if draw(st.booleans()):
        heads = tp * draw(st.sampled_from([1, 2]))
        cfg = GPTConfig(vocab_size=draw(st.sampled_from([16, 32])), seq_len=draw(st.sampled_from([4, 8])),
                        hidden=heads * draw(st.sampled_from([2, 4])), num_heads=heads, num_layers=layers,
                        mlp_ratio=draw(st.sampled_from([1, 2, 4])), tie_head=draw(st.booleans()))
        return "gpt", cfg, dp, tp, batch
    cfg = MLPConfig(width=draw(st.sampled_from([4, 8])), hidden=tp * draw(st.sampled_from([2, 4, 6])),
                    num_layers=layers, num_classes=draw(st.sampled_from([3, 5])))
    return "mlp", cfg, dp, tp, batch


def _build(kind, cfg, batch):
    torch.manual_seed(1234)
    if kind == "gpt":
        return GPT(cfg), gpt_inputs(cfg, batch, seed=7)
    return MLPModel(cfg), mlp_inputs(cfg, batch, seed=7)


def _worst(a: dict, b: dict) -> float:
    worst = 0.0
    for name, expected in b.items():
        got = a.get(name)
        if got is None or expected is None:
            if (got is None) != (expected is None):
                return float("inf")
            continue
        worst = max(worst, gap(got, expected))
    return worst


def compare_example(kind, cfg, dp, tp, batch) -> dict:
    """One train_step in parallel with a forced (dp, tp) plan vs the serial model: loss and full grads."""
    model, (x, y) = _build(kind, cfg, batch)
    serial = copy.deepcopy(model)
    world = dist.get_world_size()
    cm = pcompile.compile(model, pcompile.Cluster.local(world), (x, y), plan=pcompile.Plan.uniform(dp=dp, tp=tp))
    loss = cm.train_step(x, y)
    expected = serial(x, y)
    expected.backward()
    return {"case": f"{kind} {cfg} dp={dp} tp={tp} batch={batch}", "tp_nodes": sum(
        n.op == "call_function" and n.target.__module__ == "pcompile.runtime.collectives" for n in cm.ir.graph.nodes),
        "loss_diff": gap(loss.item(), expected.item()),
        "grad_diff": _worst(cm.full_grads(), {n: p.grad for n, p in serial.named_parameters()})}


# Always run (hypothesis's explicit phase), so every factorisation meets attention at least once.
EXPLICIT = [("gpt", GPTConfig(vocab_size=32, seq_len=8, hidden=16, num_heads=4, num_layers=2, mlp_ratio=2,
                              tie_head=True), 2, 2, 4),
            ("gpt", GPTConfig(vocab_size=32, seq_len=8, hidden=16, num_heads=4, num_layers=2, mlp_ratio=2,
                              tie_head=False), 1, 4, 2)]


def run_properties(max_examples: int) -> list[dict]:
    world = dist.get_world_size()
    records: list[dict] = []

    @settings(max_examples=max_examples, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases(world))
    def check(case):
        records.append(compare_example(*case))

    for case in EXPLICIT:
        check = example(case=case)(check)

    check()
    return records
