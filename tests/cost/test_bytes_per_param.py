"""Bytes per parameter of each precision policy pcompile's cost model supports, against the
arithmetic, read from the cost model on a tiny GPT; and the optimizer step's transient, priced
(pcompile.cost.pricing._step_temp, table_entries) and measured on torch's Adam.

Policies (CostOptions.state_bytes: parameter, gradient, optimizer bytes per element):
  fp32, Adam                     4 + 4 + 8 (m, v)                    = 16
  bf16 mixed, Adam               2 (bf16 module params) + 4 (fp32 master grads)
                                 + 12 (fp32 master + m + v)          = 18
  (momentum: one moment, SGD: none; the bf16 policy keeps the fp32 master either way)
  ZeRO-3 over dp                 all three / dp per device
  tensor parallel                the rank's shard of each split tensor
Not offered: bf16 gradients with fp32 masters (2 + 4 + 2 + 8 = 16) or FSDP's fp32-only
parameters (4 + 4 + 8 = 16 under bf16 compute): the runtime accumulates fp32 master gradients
(pcompile.runtime.precision), and the cost model charges what the runtime keeps.

Optimizer step transient (after backward, activations freed):
  foreach Adam (torch's default on CUDA; CostOptions.foreach on NCCL clusters): one fp32 copy
    of every parameter at once (torch._foreach_sqrt of the second moments) = 4 B/param of the
    stage, charged with the states in the search's table (table_entries);
  per-tensor Adam (torch's default on CPU): sqrt and the division of one tensor = 2 x 4 B x
    the largest tensor, folded into the layer's temp as a max.
"""
from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pcompile
from pcompile.cost.layer_work import example_batch, layer_work
from pcompile.cost.pricing import CostOptions, layer_cost, table_entries
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.plan import Strategy

from .conftest import analyse

POLICIES = {  # (optimizer, mixed precision) -> (param, grad, optimizer) bytes per element
    ("adam", False): (4, 4, 8),
    ("adam", True): (2, 4, 12),
    ("momentum", False): (4, 4, 4),
    ("momentum", True): (2, 4, 8),
    ("sgd", False): (4, 4, 0),
    ("sgd", True): (2, 4, 4),
}
NCCL = pcompile.Cluster.preset("8xA100-80GB")  # foreach optimizer step by default


@pytest.fixture(scope="module")
def tiny():
    """The tiny GPT (2 blocks, hidden 64, tied head) analysed at batch 8, with its model."""
    cfg = GPTConfig()
    torch.manual_seed(0)
    model = GPT(cfg)
    ir, _ = analyse(model, gpt_inputs(cfg, 8))
    return ir, model


def _memory(ir, s: Strategy, options: CostOptions, cluster=NCCL, tp: int = 1):
    batch = example_batch(ir)
    works = layer_work(ir, tp)
    return {layer: layer_cost(works[layer], cluster, s, batch, batch, options).memory for layer in ir.layers}, works


@pytest.mark.parametrize(("optimizer", "mixed"), list(POLICIES))
def test_bytes_per_parameter(tiny, optimizer, mixed):
    ir, model = tiny
    options = CostOptions(optimizer=optimizer, mixed_precision=mixed)
    expected = POLICIES[optimizer, mixed]
    assert options.state_bytes() == expected
    memories, works = _memory(ir, Strategy(), options)
    total = sum(sum(w.param_numels) for w in works.values())
    assert total == sum(p.numel() for p in model.parameters())  # the tied head is charged once
    for layer, m in memories.items():
        numel = sum(works[layer].param_numels)
        assert (m.params, m.grads, m.optimizer) == pytest.approx(tuple(b * numel for b in expected))
    charged = sum(m.params + m.grads + m.optimizer for m in memories.values())
    assert charged == pytest.approx(sum(expected) * total)
    assert sum(expected) == {"adam": 16, "momentum": 12, "sgd": 8}[optimizer] + (2 if mixed else 0)


def test_mixed_precision_keeps_fp32_gradients():
    """No bf16-gradient policy: the runtime turns each bf16 gradient into an fp32 master gradient
    as backward accumulates it, so the states are 18 B/param with Adam, not FSDP's 16."""
    assert CostOptions(mixed_precision=True).state_bytes()[1] == 4.0
    assert sum(CostOptions(mixed_precision=True).state_bytes()) == 18.0


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("dp", [2, 4])
def test_zero3_shards_every_state_and_the_step_transient(tiny, mixed, dp):
    ir, _ = tiny
    options = CostOptions(mixed_precision=mixed)
    whole, works = _memory(ir, Strategy(), options)
    sharded, _ = _memory(ir, Strategy(dp=dp, sdp=True), options)
    for layer in ir.layers:
        a, b = whole[layer], sharded[layer]
        numel = sum(works[layer].param_numels)
        assert b.params + b.grads + b.optimizer == pytest.approx(sum(options.state_bytes()) * numel / dp)
        assert b.step_temp == pytest.approx(a.step_temp / dp)


def test_tensor_parallel_charges_the_rank_shard(tiny):
    ir, _ = tiny
    options = CostOptions(mixed_precision=True)
    memories, works = _memory(ir, Strategy(tp=2, dp=1), options, tp=2)
    whole = layer_work(ir, 1)
    block = ir.layers[1]
    assert sum(works[block].param_numels) < sum(whole[block].param_numels)  # the block's Linears split
    for layer, m in memories.items():
        assert m.params + m.grads + m.optimizer == pytest.approx(18 * sum(works[layer].param_numels))


def test_foreach_step_transient_is_one_fp32_copy_charged_with_the_states(tiny):
    ir, _ = tiny
    for mixed in (False, True):  # the masters are fp32 either way
        options = CostOptions(mixed_precision=mixed)
        memories, works = _memory(ir, Strategy(), options)
        assert options.foreach(NCCL)
        for layer, m in memories.items():
            assert m.step_temp == pytest.approx(4.0 * sum(works[layer].param_numels))
            c = layer_cost(works[layer], NCCL, Strategy(), 8, 8, options)
            _, _, _, state, act, temp = table_entries(c, foreach=True)
            assert state == pytest.approx(m.params + m.grads + m.optimizer + m.step_temp)  # on top of the states
            assert temp == m.temp and act == m.activations


def test_per_tensor_step_transient_is_two_copies_of_the_largest_tensor(tiny):
    ir, _ = tiny
    gloo = pcompile.Cluster.local(4)
    options = CostOptions()
    assert not options.foreach(gloo)
    memories, works = _memory(ir, Strategy(), options, cluster=gloo)
    for layer, m in memories.items():
        assert m.step_temp == pytest.approx(2 * 4.0 * works[layer].largest_param)
        c = layer_cost(works[layer], gloo, Strategy(), 8, 8, options)
        _, _, _, state, _, temp = table_entries(c, foreach=False)
        assert state == pytest.approx(m.params + m.grads + m.optimizer)  # not in the states
        assert temp == max(m.temp, m.step_temp)
    sgd, _ = _memory(ir, Strategy(), CostOptions(optimizer="sgd"))
    assert all(m.step_temp == 0 for m in sgd.values())


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages ops create (not their inputs', not views) that are still alive,
    checked at every op: the transient of what runs inside."""

    def __init__(self):
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ref in [r for r in self.live if r.expired()]:
            del self.live[ref]
        inputs = {StorageWeakRef(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in inputs and ref not in self.live:
                    self.live[ref] = t.untyped_storage().nbytes()
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def _measured_step_transient(model, foreach: bool, cls=torch.optim.Adam, **kwargs) -> int:
    params = list(model.parameters())
    optimizer = cls(params, lr=1e-3, foreach=foreach, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # the first step creates the moments (states, not transient)
    mode = LiveBytes()
    with torch.no_grad(), mode:
        optimizer.step()
    return mode.peak


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_priced_step_transient_is_torch_adams(tiny, cls):
    """What pcompile charges for the step is what torch's Adam / AdamW allocate in it: foreach,
    the sum over layers of step_temp (all at once); per tensor, the largest layer's."""
    ir, model = tiny
    model = GPT(model.cfg)  # fresh parameters, no optimizer state
    foreach, _ = _memory(ir, Strategy(), CostOptions(optimizer_foreach=True))
    loop, _ = _memory(ir, Strategy(), CostOptions(optimizer_foreach=False))
    assert _measured_step_transient(model, True, cls) == pytest.approx(
        sum(m.step_temp for m in foreach.values()), rel=0.01)
    assert _measured_step_transient(GPT(model.cfg), False, cls) == pytest.approx(
        max(m.step_temp for m in loop.values()), rel=0.01)
