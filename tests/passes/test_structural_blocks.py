"""Repeated blocks found by structure (issue #17): the children of an nn.Sequential of one class
and the same shapes whatever their names (torchvision's `encoder_layer_N`), and one module
applied N times in sequence (ALBERT's shared layer: N layers `block`, `block@1`, ...), under
fx and torch.export; layers of one shared parameter at different tp degrees are refused. Stock
modules that hold Linears (nn.TransformerEncoderLayer, nn.MultiheadAttention), which fx keeps
as one call, make capture="auto" export the model; forced fx, tp says to export."""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pcompile
from pcompile.errors import PcompileError
from pcompile.passes.trace import capture
from pcompile.plan import LayerAssignment, Plan, Strategy
from tests.models.structural import SharedLayers, StockTransformer, VisionTransformer, token_inputs, vit_inputs
from tests.passes.test_replicate import analysed, assert_same_ir
from tests.toy import node

VIT_BLOCKS = [f"encoder.layers.encoder_layer_{i}" for i in range(3)]


def _in_module(ir, path: str) -> list:
    """The ops run by the module at `path` (by target or nn_module_stack: fx and export alike)."""
    def paths(n):
        stack = n.meta.get("nn_module_stack") or {}
        return [str(n.target)] if n.op == "call_module" else [v[0] for v in stack.values()]
    return [n for n in ir.graph.nodes if n.op in ("call_module", "call_function") and path in paths(n)]


def _ir(model, inputs, capture="auto", plan=None, stop_after="layers"):
    return pcompile.compile(model, pcompile.Cluster.local(4), inputs, plan=plan, stop_after=stop_after,
                            capture=capture)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_torchvision_vit_blocks_are_its_encoder_layers(capture):
    ir = _ir(VisionTransformer(), vit_inputs(0), capture)
    assert ir.layers == ["pre", *VIT_BLOCKS, "post"] and ir.block_layers == VIT_BLOCKS
    conv, head = _in_module(ir, "conv_proj"), _in_module(ir, "heads.head")
    assert conv and {ir.meta(n).layer for n in conv} == {"pre"}  # the patch embedding, before the first block
    assert head and {ir.meta(n).layer for n in head} == {"post"}


class _Pair(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.a, self.b = nn.Linear(8, width), nn.Linear(width, 8)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


class _Trunk(nn.Module):
    """Blocks in a Sequential under any names; `widths` alike or not."""

    def __init__(self, widths=(8, 8, 8)):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.trunk = nn.Sequential(OrderedDict((name, _Pair(w))
                                               for name, w in zip(("first", "second", "third"), widths)))
        self.out = nn.Linear(8, 2)

    def forward(self, x, y):
        return F.mse_loss(self.out(self.trunk(self.stem(x))), y)


def test_a_sequential_of_alike_blocks_under_any_names():
    ir = _ir(_Trunk(), (torch.randn(4, 4), torch.randn(4, 2)))
    assert ir.layers == ["pre", "trunk.first", "trunk.second", "trunk.third", "post"]
    assert ir.meta(node(ir, "stem")).layer == "pre" and ir.meta(node(ir, "out")).layer == "post"


def test_a_sequential_of_blocks_of_other_shapes_is_not_a_block_list():
    ir = _ir(_Trunk(widths=(8, 16, 8)), (torch.randn(4, 4), torch.randn(4, 2)))
    # no blocks: a unit per child, the Megatron pairs across them joined (stem's columns, out's rows)
    assert ir.layers == ["pre", "stem+trunk+out", "post"] and ir.block_layers == []


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_one_module_applied_n_times_is_n_layers(capture):
    ir = _ir(SharedLayers(times=3), token_inputs(0), capture)
    assert ir.layers == ["pre", "block", "block@1", "block@2", "post"]
    assert ir.block_layers == ["block", "block@1", "block@2"]
    assert [ir.meta(n).layer for n in _in_module(ir, "block.up")] == ["block", "block@1", "block@2"]
    assert {ir.meta(n).layer for n in _in_module(ir, "embed")} == {"pre"}


class _CalledApart(nn.Module):
    """One Linear applied twice with another module between: not blocks in sequence."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.mid = nn.Linear(8, 8)
        self.act = nn.Tanh()  # called twice, no parameters: never a block

    def forward(self, x, y):
        return F.mse_loss(self.act(self.proj(self.act(self.mid(self.proj(x))))), y)


def test_a_module_called_twice_apart_is_no_block_but_a_unit_per_call():
    ir = _ir(_CalledApart(), (torch.randn(4, 8), torch.randn(4, 8)))
    assert ir.block_layers == []  # not in sequence: top-level children, each call its own (contiguous) unit
    assert ir.layers == ["pre", "proj+mid", "act", "proj@1", "act@1", "post"]  # proj, mid: a Megatron pair


def test_shared_layers_at_different_tp_degrees_are_refused_before_splitting():
    plan = Plan(num_devices=4, default=Strategy(dp=4), layers=(LayerAssignment("block@1", Strategy(dp=2, tp=2)),))
    with pytest.raises(PcompileError) as info:
        _ir(SharedLayers(times=3), token_inputs(0), plan=plan, stop_after="tensor_parallel")
    message = str(info.value)
    assert "block.up.weight is split by tp and read by layers at different tp degrees" in message
    assert "block: tp=1, block@1: tp=2, block@2: tp=1" in message and "one tp degree" in message


def test_stock_modules_holding_linears_are_exported_so_tp_can_split_them():
    ir = _ir(StockTransformer(), token_inputs(0))
    assert ir.capture == "export" and ir.layers == ["pre", "encoder.layers.0", "encoder.layers.1", "post"]
    _, _, report = capture(StockTransformer(), token_inputs(0), "auto")
    assert report[0].startswith("captured with torch.export because torch.fx keeps encoder (TransformerEncoder) "
                                "and 1 more as one call, whose Linears tensor parallelism could not split"), report
    assert _ir(_Trunk(), (torch.randn(4, 4), torch.randn(4, 2))).capture == "fx"  # nothing hidden: fx stays


class _EncoderLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
                                    for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.pow(2).mean()


def test_forced_fx_on_stock_modules_says_to_export_for_tp():
    with pytest.raises(PcompileError) as info:
        _ir(_EncoderLayers(), (torch.randn(8, 4, 16),), capture="fx", plan=Plan.uniform(dp=2, tp=2),
            stop_after="search")
    assert ("no Linear in the layer that torch.fx records: it keeps layers.0 (TransformerEncoderLayer) as one "
            "call - capture with capture='export'") in str(info.value)


def _five_named(capture: str):
    """ViT's five encoder_layer_N under fx (its attention one call); under export five named _Pair
    blocks (export's MultiheadAttention blocks do not repeat node for node: captured whole)."""
    if capture == "fx":
        return VisionTransformer(layers=5), vit_inputs(0), "encoder.layers", "encoder.layers.encoder_layer_"
    model = _Trunk()
    model.trunk = nn.Sequential(OrderedDict((f"pair_{i}", _Pair(8)) for i in range(5)))
    return model, (torch.randn(4, 4), torch.randn(4, 2)), "trunk", "trunk.pair_"


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_named_blocks_are_captured_once_and_stitched_like_the_full_capture(capture):
    model, inputs, prefix, block = _five_named(capture)
    fast, full = (analysed(model, inputs, capture, full=f) for f in (False, True))
    assert fast.replicas is not None and (fast.replicas.prefix, fast.replicas.blocks) == (prefix, 5)
    assert full.replicas is None
    assert_same_ir(fast, full, model)
    assert fast.block_layers == [f"{block}{i}" for i in range(5)]
