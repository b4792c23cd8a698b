"""The expert-parallel rewrite on the graph (passes/expert_parallel.py): each MoE block's dense
mixture becomes one expert_mixture node reading every expert's parameters (the router, top-k
and aux loss stay), and what it cannot run exactly is refused naming the layer: batched experts
with tp, experts that do not split over ep, no MoE layer, ZeRO-3 / ZeRO-2 with ep; HF Mixtral's batched
experts become one gated_expert_mixture per layer, their weights split over "ep"."""
import dataclasses

import pytest
import torch

import pcompile
from pcompile import Plan
from pcompile.errors import PcompileError
from pcompile.ir import Shard
from pcompile.models import GPT, GPTConfig, MoEGPT, MoEGPTConfig, gpt_inputs, moe_gpt_inputs
from pcompile.runtime.expert_parallel import expert_mixture, gated_expert_mixture

CFG = MoEGPTConfig(num_layers=2, num_experts=4, top_k=2, hidden=16, num_heads=2, seq_len=8, vocab_size=32,
                   aux_loss_coef=0.01)


def _rewrite(model, inputs, plan):
    return pcompile.compile(model, pcompile.Cluster.local(plan.num_devices), inputs, plan=plan,
                            stop_after="expert_parallel")


def test_dense_mixture_becomes_one_dispatch_per_block():
    torch.manual_seed(0)
    ir = _rewrite(MoEGPT(CFG), moe_gpt_inputs(CFG, 4), Plan.uniform(dp=4, ep=2))
    mixtures = [n for n in ir.graph.nodes if n.target is expert_mixture]
    assert [ir.meta(n).layer for n in mixtures] == ["blocks.0", "blocks.1"]
    tokens, indices, gates, activation, axis, size, experts, bias, *params = mixtures[0].args
    assert (tokens.name, activation, axis, size, experts, bias) == ("blocks_0_ln2", "gelu", "ep", 2, 4, True)
    assert [p.target for p in params[:4]] == [f"blocks.0.moe.experts.0.{m}.{w}" for m in ("fc", "out")
                                              for w in ("weight", "bias")] and len(params) == 16
    modules = {str(n.target) for n in ir.graph.nodes if n.op == "call_module"}
    assert not any(".experts." in m for m in modules) and "blocks.0.moe.router" in modules
    assert sum(n.target is torch.topk for n in ir.graph.nodes) == 2  # the aux loss still reads the router


def test_mixtral_batched_experts_split_over_ep():
    from tests.distributed.ranks_statistics import batch, mixtral

    torch.manual_seed(0)
    ir = _rewrite(mixtral(), batch(0), Plan.uniform(dp=4, ep=2))
    mixtures = [n for n in ir.graph.nodes if n.target is gated_expert_mixture]
    assert [ir.meta(n).layer for n in mixtures] == ["model.model.layers.0", "model.model.layers.1"]
    assert mixtures[0].args[3:7] == ("silu", "ep", 2, 4)
    name = "model.model.layers.0.mlp.experts.gate_up_proj"
    assert [str(a.target) for a in mixtures[0].args[7:]] == [name, name.replace("gate_up", "down")]
    assert ir.param_shardings[name] == Shard("ep", 0, 2)
    assert not any("grouped_mm" in str(n.target) for n in ir.graph.nodes)


def test_refusals():
    from tests.distributed.ranks_statistics import batch, mixtral

    torch.manual_seed(0)
    # not a refusal: under tp the batched experts stay whole on every tp rank, split over ep only
    ir = _rewrite(mixtral(), batch(0), Plan.uniform(dp=2, tp=2, ep=2))
    experts = {name: cut for name, cut in ir.param_shardings.items() if "experts" in name}
    assert experts and {cut.axis for cut in experts.values()} == {"ep"}
    two = dataclasses.replace(CFG, num_experts=2)
    with pytest.raises(PcompileError, match="2 experts do not split over 4 ranks"):
        _rewrite(MoEGPT(two), moe_gpt_inputs(two, 4), Plan.uniform(dp=4, ep=4))
    with pytest.raises(PcompileError, match="ZeRO-3 is not supported"):
        _rewrite(MoEGPT(CFG), moe_gpt_inputs(CFG, 4), Plan.uniform(dp=4, ep=2, sdp=True))
    with pytest.raises(PcompileError, match="ZeRO-2 is not supported"):
        _rewrite(MoEGPT(CFG), moe_gpt_inputs(CFG, 4), Plan.uniform(dp=4, ep=2, zero2=True))
    with pytest.raises(PcompileError, match="no layer it names has a mixture of experts"):
        _rewrite(GPT(GPTConfig(num_layers=1)), gpt_inputs(GPTConfig(), 4), Plan.uniform(dp=2, ep=2))


def test_expert_tensor_parallelism_splits_each_expert_over_tp():
    """etp: fc column-, out row-parallel over tp (out's bias whole), the mixture a partial sum
    over tp reduced once after it, its tokens and gates entering through tp_copy; refused for
    batched experts and without both ep > 1 and tp > 1 (equal to serial: tests/distributed)."""
    from pcompile.runtime.collectives import tp_copy, tp_reduce
    from tests.distributed.ranks_statistics import batch, mixtral

    torch.manual_seed(0)
    ir = _rewrite(MoEGPT(CFG), moe_gpt_inputs(CFG, 4), Plan.uniform(dp=2, tp=2, ep=2, etp=True))
    expert = "blocks.0.moe.experts.0"
    assert {n: ir.param_shardings.get(f"{expert}.{n}") for n in ("fc.weight", "fc.bias", "out.weight", "out.bias")} \
        == {"fc.weight": Shard("tp", 0, 2), "fc.bias": Shard("tp", 0, 2), "out.weight": Shard("tp", 1, 2),
            "out.bias": None}
    mixture = next(n for n in ir.graph.nodes if n.target is expert_mixture)
    assert mixture.kwargs == {"tp_split": True} and [u.target for u in mixture.users] == [tp_reduce]
    assert mixture.args[0].target is tp_copy and mixture.args[2].target is tp_copy
    assert str(ir.meta(mixture).placement) == "P@tp"
    with pytest.raises(PcompileError, match="batched weights"):
        _rewrite(mixtral(), batch(0), Plan.uniform(dp=2, tp=2, ep=2, etp=True))
    with pytest.raises(PcompileError, match="needs ep > 1 and tp > 1"):
        _rewrite(MoEGPT(CFG), moe_gpt_inputs(CFG, 4), Plan.uniform(dp=4, ep=2, etp=True))
