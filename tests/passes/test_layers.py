"""Layer detection: the repeated blocks in order plus "pre" and "post"; without repeated
blocks, one layer per top-level child. Every node gets a layer and layers are contiguous."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from pcompile.passes.layers import find_block_prefix
from tests.toy import TwoLinear, analyse, node, rows


class SequentialNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
        self.extra = nn.ModuleList([nn.Linear(8, 8), nn.ReLU()])  # mixed classes: not repeated blocks

    def forward(self, x, y):
        return F.mse_loss(self.extra[1](self.extra[0](self.body(self.stem(x)))), y)


def _contiguous(ir) -> bool:
    sequence = [ir.meta(n).layer for n in ir.graph.nodes]
    runs = [layer for i, layer in enumerate(sequence) if i == 0 or sequence[i - 1] != layer]
    return runs == ir.layers


def test_gpt_layers():
    cfg = GPTConfig(num_layers=3)
    ir = analyse(GPT(cfg), gpt_inputs(cfg, 2))
    assert ir.layers == ["pre", "blocks.0", "blocks.1", "blocks.2", "post"]
    assert ir.block_layers == ["blocks.0", "blocks.1", "blocks.2"]
    assert _contiguous(ir)
    assert ir.meta(node(ir, "tok_emb")).layer == "pre"
    assert ir.meta(node(ir, "add")).layer == "pre"  # token + position embedding
    assert ir.meta(node(ir, "blocks_1_attn_q")).layer == "blocks.1"
    assert ir.meta(node(ir, "add_2")).layer == "blocks.0"  # residual add, no module of its own
    assert rows(ir)["head"][9] == "post" and rows(ir)["output"][9] == "post"
    sizes = [len(ir.nodes_of(layer)) for layer in ir.layers]
    assert sizes[1] == sizes[2] == sizes[3] and sum(sizes) == len(ir.graph.nodes)


def test_mlp_model_layers():
    ir = analyse(MLPModel(MLPConfig(num_layers=2)), mlp_inputs(MLPConfig(), 4))
    assert ir.layers == ["pre", "blocks.0", "blocks.1", "post"]
    assert ir.meta(node(ir, "classifier")).layer == "post"
    assert _contiguous(ir)


def test_sequential_blocks_win_over_mixed_module_list():
    model = SequentialNet()
    assert find_block_prefix(model) == "body"
    ir = analyse(model, (torch.randn(2, 4), torch.randn(2, 8)))
    assert ir.layers == ["pre", "body.0", "body.1", "body.2", "post"]
    assert ir.meta(node(ir, "stem")).layer == "pre"
    assert ir.meta(node(ir, "extra_0")).layer == "post"


def test_top_level_sequential_is_the_block_container():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert find_block_prefix(model) == ""


def test_model_without_repeated_blocks_gets_one_layer_per_child_pairs_joined():
    ir = analyse(TwoLinear(), (torch.randn(3, 8), torch.randn(3, 8)))
    assert ir.layers == ["pre", "up+down", "post"]  # up's split output reaches down: one Megatron pair
    assert ir.block_layers == []
    assert [ir.meta(n).layer for n in ir.graph.nodes] == ["pre", "pre", "up+down", "up+down", "up+down", "post",
                                                           "post"]


def test_single_block_model_still_has_a_block_layer():
    cfg = GPTConfig(num_layers=1)
    ir = analyse(GPT(cfg), gpt_inputs(cfg, 2))
    assert ir.layers == ["pre", "blocks.0", "post"] and ir.block_layers == ["blocks.0"]
