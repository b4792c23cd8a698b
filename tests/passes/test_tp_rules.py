"""Sharding propagation: Megatron's column/row pairs found from the graph, with the reason a
layer stays unsplit when an op cannot take a split tensor."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from pcompile.sharding.tp_rules import linear_parts, plan_tensor_parallel, view_groups, view_split_dim
from tests.toy import Attention, TwoLinear, analyse, node


class SoftmaxOverFeatures(nn.Module):
    """Softmax along the features a column Linear would split: fc must stay replicated."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x, y):
        return F.mse_loss(self.out(torch.softmax(self.fc(x), dim=-1)), y)


def _names(nodes) -> list[str]:
    return sorted(n.name for n in nodes)


def test_view_groups():
    assert view_groups([2, 6], [2, 2, 3]) == [([0], [0]), ([1], [1, 2])]
    assert view_groups([4, 5, 6], [20, 6]) == [([0, 1], [0]), ([2], [1])]
    assert view_groups([2, 3], [3, 2]) == [([0, 1], [0, 1])]  # no common factor: one merged group


def test_view_split_dim_follows_the_heads():
    # [b, t, hidden] -> [b, t, heads, head_dim]: the split of hidden becomes a split of heads
    assert view_split_dim((8, 32, 64), (8, 32, 4, 16), dim=2, degree=2) == (2, "")
    out, why = view_split_dim((8, 32, 64), (8, 32, 4, 16), dim=2, degree=8)
    assert out is None and "dim 2 of size 4" in why and "not divisible by tp=8" in why
    out, why = view_split_dim((8, 32, 64), (8, 2048), dim=2, degree=2)
    assert out is None and "moves split dim 2" in why


def test_two_linear_is_one_column_row_pair():
    ir = analyse(TwoLinear(8, 16), (torch.randn(3, 8), torch.randn(3, 8)))
    p, reasons = plan_tensor_parallel(ir, {layer: 2 for layer in ir.layers})
    assert _names(p.column) == ["up"] and _names(p.row) == ["down"]
    assert {n.name: d for n, d in p.split_dim.items()} == {"up": 1, "relu": 1}
    assert reasons == {"pre": "no Linear in the layer", "post": "no Linear in the layer"}  # one unit up+down
    parts = linear_parts(ir.gm, node(ir, "up"))
    assert (parts.weight, parts.bias, parts.in_features, parts.out_features) == ("up.weight", "up.bias", 8, 16)


def test_attention_splits_heads():
    ir = analyse(Attention(16, 4), (torch.randn(2, 5, 16), torch.randn(2, 5, 16)))
    p, _ = plan_tensor_parallel(ir, {layer: 2 for layer in ir.layers})
    assert _names(p.column) == ["k", "q", "v"] and _names(p.row) == ["proj"]
    split = {n.name: d for n, d in p.split_dim.items()}
    assert split["view"] == 2 and split["transpose"] == 1 and split["scaled_dot_product_attention"] == 1
    assert split["reshape"] == 2
    assert {n.name: d for n, d in p.view_dims.items()} == {"view": 2, "view_1": 2, "view_2": 2, "reshape": 2}


def test_gpt_pairs_per_block_and_vocab_parallel_embedding_and_head():
    cfg = GPTConfig(num_layers=2)
    ir = analyse(GPT(cfg), gpt_inputs(cfg, 2))
    p, reasons = plan_tensor_parallel(ir, {layer: 2 for layer in ir.layers})
    for b in (0, 1):
        assert {f"blocks_{b}_attn_{x}" for x in "qkv"} | {f"blocks_{b}_mlp_fc"} <= {n.name for n in p.column}
    # the tied LM head is column-parallel over the vocabulary, its cross-entropy computed from
    # the split logits, and the token embedding (not the positions') split the same way
    assert len(p.column) == 9 and "head" in _names(p.column) and len(p.row) == 4
    assert _names(p.losses) == ["cross_entropy"] and _names(p.embeddings) == ["tok_emb"]
    assert not reasons


def test_heads_not_divisible_drop_attention_with_the_reason():
    cfg = GPTConfig(num_layers=2)  # 4 heads, hidden 64
    ir = analyse(GPT(cfg), gpt_inputs(cfg, 2))
    p, reasons = plan_tensor_parallel(ir, {"blocks.0": 8})
    assert _names(p.column) == ["blocks_0_mlp_fc"]  # only the MLP is left split
    # partly split because tp does not divide the heads: the reason stays, so a forced plan fails
    assert "not divisible by tp=8" in reasons["blocks.0"]
    p, reasons = plan_tensor_parallel(ir, {"blocks.0": 3})
    assert p.column == set() and "not divisible by tp=3" in reasons["blocks.0"]


def test_softmax_along_the_split_dim_keeps_the_linear_replicated():
    ir = analyse(SoftmaxOverFeatures(), (torch.randn(3, 8), torch.randn(3, 8)))
    p, reasons = plan_tensor_parallel(ir, {"fc": 2, "out": 2})
    assert "fc" not in {n.name for n in p.column} and p.row == set()
    assert "softmax along the split dim" in reasons["fc"]


def test_mlp_model_blocks_split_and_classifier_over_its_classes():
    cfg = MLPConfig(num_layers=2)
    ir = analyse(MLPModel(cfg), mlp_inputs(cfg, 4))
    p, reasons = plan_tensor_parallel(ir, {layer: 4 for layer in ir.layers})
    assert _names(p.column) == ["blocks_0_up", "blocks_1_up", "classifier"]  # 8 classes: the parallel loss
    assert _names(p.row) == ["blocks_0_down", "blocks_1_down"]
    assert _names(p.losses) == ["cross_entropy"] and "post" not in reasons
