"""MoE layers found in captured graphs (pcompile.sharding.moe): the built-in MoE GPT under fx
(router, top-k, gates renormalised, 4 experts as 2-Linear MLPs, their gated sum, the gate
matrix), Hugging Face Mixtral under torch.export (batched expert weights), and what is not one
(a top-k of logits that no router Linear feeds, an expert mixture not weighted by the gates)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import pcompile
from pcompile.models import MoEGPT, MoEGPTConfig, moe_gpt_inputs
from pcompile.sharding.moe import find_moe_layers

CFG = MoEGPTConfig(num_layers=2, num_experts=4, top_k=2, hidden=16, num_heads=2, seq_len=8, vocab_size=32)


def _ir(model, inputs, capture="auto"):
    return pcompile.compile(model, pcompile.Cluster.local(2), inputs, plan=pcompile.Plan.uniform(dp=2),
                            stop_after="layers", capture=capture)


def test_builtin_moe_gpt_under_fx():
    torch.manual_seed(0)
    layers = find_moe_layers(_ir(MoEGPT(CFG), moe_gpt_inputs(CFG, 2)))
    assert [m.layer for m in layers] == ["blocks.0", "blocks.1"]
    first = layers[0]
    assert (first.form, first.num_experts, first.top_k, first.router_weight) == ("modules", 4, 2,
                                                                                  "blocks.0.moe.router.weight")
    assert first.tokens.name == "blocks_0_ln2" and first.gates.name == "truediv" and first.combine is not None
    assert [e.path for e in first.experts] == [f"blocks.0.moe.experts.{i}" for i in range(4)]
    assert {e.activation for e in first.experts} == {"gelu"}
    assert first.expert_params[:4] == ("blocks.0.moe.experts.0.fc.weight", "blocks.0.moe.experts.0.fc.bias",
                                       "blocks.0.moe.experts.0.out.weight", "blocks.0.moe.experts.0.out.bias")
    assert first.output.name == "add_4" and [e.term.name for e in first.experts] == ["mul", "mul_1", "mul_2", "mul_3"]


def test_hf_mixtral_under_export():
    from tests.distributed.ranks_statistics import batch, mixtral

    torch.manual_seed(0)
    layers = find_moe_layers(_ir(mixtral(), batch(0)))
    assert [m.layer for m in layers] == ["model.model.layers.0", "model.model.layers.1"]
    assert all(m.form == "stacked" and m.num_experts == 4 and m.top_k == 2 for m in layers)
    assert [m.output.name for m in layers] == ["sum_2", "sum_4"]  # the gated sum back in the tokens' shape
    gate_up, down, activation, source = layers[0].gated
    assert (gate_up.rpartition(".")[2], down.rpartition(".")[2], activation) == ("gate_up_proj", "down_proj", "silu")
    assert source.name == "view_3"  # what the experts read (the router reads a reshape of it)
    assert layers[1].expert_params == ("model.model.layers.1.mlp.experts.gate_up_proj",
                                       "model.model.layers.1.mlp.experts.down_proj")


class _Sampler(nn.Module):
    """A top-k that is no router's (of a head's logits), and experts summed without their gates."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 8)
        self.router = nn.Linear(8, 2)
        self.experts = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(8, 8), "out": nn.Linear(8, 8)}) for _ in range(2))

    def forward(self, x, y):
        top = torch.topk(self.head(x), 2, dim=-1).values.sum()
        probs = F.softmax(self.router(x), dim=-1)
        gates, chosen = torch.topk(probs, 1, dim=-1)
        mixed = sum(self.experts[e]["out"](F.relu(self.experts[e]["fc"](x))) for e in range(2))  # ungated
        return top + (mixed * gates).sum() + F.mse_loss(x, y)


def test_what_is_not_an_moe_layer():
    layers = find_moe_layers(_ir(_Sampler(), (torch.randn(4, 8), torch.randn(4, 8)), capture="fx"))
    assert len(layers) == 1 and layers[0].form == "modules"  # the router's top-k only
    assert layers[0].combine is None  # not the gated top-k mixture: expert parallelism must refuse it
