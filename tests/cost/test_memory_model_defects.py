"""Defects of the memory model found against Galvatron's measured profiles and torch's own
behaviour (issue #15, item 5; benchmarks/galvatron_memory.py). Each is a strict xfail stating
the numbers: it starts passing (and fails as XPASS) when the defect is fixed - then drop the mark.
Controls without the defect pass, so the measurements themselves are sound.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

import pcompile
from pcompile.cost.layer_work import example_batch, layer_work
from pcompile.cost.pricing import CostOptions, layer_cost, table_entries
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.plan import Strategy
from pcompile.search.schedules import backward_peak

from .conftest import analyse

NCCL = pcompile.Cluster.preset("8xA100-80GB")


def _memories(ir, options: CostOptions, cluster=NCCL, s: Strategy = Strategy()):
    batch = example_batch(ir)
    works = layer_work(ir, s.tp)
    return [layer_cost(works[layer], cluster, s, batch, batch, options).memory for layer in ir.layers]


# -- the foreach optimizer step's transient ------------------------------------------------------
def _table_peak(memories, foreach: bool) -> float:
    """A stage's memory as the search's knapsack adds it up from CostTable cells: states (with
    the step transient under foreach) + activations (one micro-batch) + the largest temp."""
    cells = [table_entries(_cost(m), foreach) for m in memories]
    return sum(c[3] for c in cells) + sum(c[4] for c in cells) + max(c[5] for c in cells)


def _cost(memory):
    from pcompile.cost.pricing import LayerCost

    return LayerCost(0.0, 0.0, 0.0, 0.0, memory)


@pytest.mark.xfail(strict=True, reason=(
    "the search's table charges the foreach step transient (4 B/param, all layers at once) on top of "
    "the activations (pricing.table_entries: it is added to state_memory), but the step runs after "
    "backward has freed them: the true peak is states + max(activations + temp, transient). For the "
    "tiny GPT at batch 8 the table adds 474 KB while the exact peak (schedules.backward_peak) does not "
    "move; for Llama-7B at tp1 (202M params a layer) it is 772 MiB a layer, 24 GiB for 32 layers, "
    "over-charged whenever the activations exceed it."))
def test_foreach_step_transient_raises_the_search_memory_only_as_much_as_the_true_peak():
    cfg = GPTConfig()
    ir, _ = analyse(GPT(cfg), gpt_inputs(cfg, 8))
    memories = _memories(ir, CostOptions(optimizer_foreach=True))
    without = [dataclasses.replace(m, step_temp=0.0) for m in memories]
    exact = backward_peak(memories, foreach=True) - backward_peak(without, foreach=True)
    assert sum(m.activations for m in memories) > sum(m.step_temp for m in memories) > 0  # the case shown
    assert _table_peak(memories, True) - _table_peak(without, True) == pytest.approx(exact, abs=1024)


# -- activations a bf16 model keeps in fp32 ------------------------------------------------------
class Block(nn.Module):
    """A residual block normalised as Hugging Face's LlamaRMSNorm does it (upcast = True): the
    statistics in fp32 whatever the compute dtype. `upcast=False`: the same maths in the input dtype."""

    def __init__(self, hidden: int, upcast: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.fc = nn.Linear(hidden, hidden)
        self.upcast = upcast

    def forward(self, x):
        h = x.float() if self.upcast else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x + self.fc(self.weight * h.type_as(x))


class Net(nn.Module):
    def __init__(self, upcast: bool, hidden: int = 64, blocks: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(hidden, upcast) for _ in range(blocks))

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        return F.mse_loss(x, y)


def _saved_bytes_in_bf16(model: nn.Module, x, y) -> int:
    """Bytes autograd keeps for backward when the model runs in bf16 (as the runtime's
    mixed precision runs it: module and floating inputs cast), each storage once, parameters aside."""
    model = model.to(torch.bfloat16)
    params = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in seen and ref not in params:
            seen.add(ref)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x.bfloat16(), y.bfloat16())
    del loss
    return total


def _predicted_and_measured(upcast: bool) -> tuple[float, int]:
    torch.manual_seed(0)
    x, y = torch.randn(8, 128, 64), torch.randn(8, 128, 64)
    model = Net(upcast)
    ir, _ = analyse(model, (x, y))
    predicted = sum(m.activations for m in _memories(ir, CostOptions(mixed_precision=True)))
    return predicted, _saved_bytes_in_bf16(model, x, y)


def test_bf16_activations_match_torch_without_fp32_upcasts():
    predicted, measured = _predicted_and_measured(upcast=False)
    assert predicted == pytest.approx(measured, rel=0.02)


@pytest.mark.xfail(strict=True, reason=(
    "CostOptions.activation_scale halves every saved byte of the fp32 IR under bf16, but tensors the "
    "model casts to fp32 itself stay 4-byte: an RMSNorm that upcasts (HF LlamaRMSNorm) saves its fp32 "
    "input copy (4 B/element, charged 2). Here 1.31 MB predicted vs 1.58 MB measured in bf16 (-17 %: "
    "the two blocks whose input needs a gradient, 2 B/element each); HF Llama-7B: 2 norms x 16 MiB/sample "
    "under-charged a layer (372 MiB/sample kept vs 340 charged at seq 2048), once the runtime runs HF "
    "Llama in bf16 at all (see tests/distributed/test_hf_bf16_upcast.py)."))
def test_bf16_activations_count_the_models_own_fp32_upcasts():
    predicted, measured = _predicted_and_measured(upcast=True)
    assert predicted == pytest.approx(measured, rel=0.02)


# -- attention with dropout on GPU clusters ------------------------------------------------------
def _block_activations(dropout: float) -> float:
    cfg = GPTConfig(seq_len=128, hidden=64, num_heads=4, dropout=dropout)
    ir, _ = analyse(GPT(cfg), gpt_inputs(cfg, 4))
    memories = _memories(ir, CostOptions(mixed_precision=True))
    return memories[ir.layers.index("blocks.0")].activations


@pytest.mark.xfail(strict=True, reason=(
    "the memory pass observes SDPA on CPU fake tensors, where dropout_p > 0 takes the math kernel and "
    "saves the [b, h, s, s] attention probabilities and dropout mask; on a CUDA (NCCL) cluster flash / "
    "memory-efficient attention keeps only q, k, v, out, logsumexp and an RNG state, whatever the "
    "dropout. Tiny GPT (seq 128): 2.5x the dropout-0 block's activations; GPT-6.7B at seq 2048 with "
    "Galvatron's dropout 0.1: 1024 MiB/sample a layer charged vs 272 measured by Galvatron on A100s "
    "(benchmarks/galvatron_memory.py, gpt_dropout_act_ratio)."))
def test_attention_dropout_saves_no_probabilities_on_gpu_clusters():
    assert _block_activations(0.1) <= 1.05 * _block_activations(0.0)
