"""The front end on one process: which capture path runs and why, what an exported graph looks
like to the later passes (original parameter names, parameters read where they are used, a
symbolic batch), layers from export's module stacks, and the one error a model gets when
neither path can capture it."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pcompile
from pcompile import PcompileError, Plan
from pcompile.models import GPT, GPTConfig, gpt_inputs
from tests.models.zoo import ResNet, image_batch, llama, token_batch

pytest.importorskip("transformers")


def _ir(model, inputs, stop_after="layers", capture="auto", devices=1, plan=None):
    return pcompile.compile(model, pcompile.Cluster.local(devices), inputs, plan=plan, capture=capture,
                            stop_after=stop_after)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # a branch on a tensor value: neither fx nor export can capture it
            return self.fc(x)
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([DataDependent(), DataDependent()])

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        return F.mse_loss(x, y)


def test_a_model_neither_path_captures_gets_one_error_naming_module_and_construct():
    with pytest.raises(PcompileError) as info:
        _ir(Net(), (torch.randn(2, 4), torch.randn(2, 4)), stop_after="trace")
    message = str(info.value)
    assert "neither capture path works for Net.forward" in message
    assert "module 'blocks.0' (DataDependent)" in message  # both paths name the module
    assert "depends on tensor values" in message and "if x.sum() > 0" in message  # the construct and its line
    assert "fix:" in message


def test_fx_forced_on_a_hf_model_says_what_failed_and_suggests_export():
    with pytest.raises(PcompileError) as info:
        _ir(llama(), token_batch(0), stop_after="trace", capture="fx")
    assert "module 'model.model' (LlamaModel)" in str(info.value) and "capture='export'" in str(info.value)


def test_unknown_capture_and_non_loss_output_are_errors():
    with pytest.raises(PcompileError, match="not a capture path"):
        _ir(ResNet(), image_batch(0), stop_after="trace", capture="dynamo")

    class ReturnsTuple(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, y):
            out = self.fc(x)
            return F.mse_loss(out, y), out

    for capture in ("fx", "export"):
        with pytest.raises(PcompileError, match="not the loss tensor"):
            _ir(ReturnsTuple(), (torch.randn(2, 4), torch.randn(2, 4)), stop_after="trace", capture=capture)


def test_export_forced_on_a_plain_model_keeps_names_and_computes_the_same_loss():
    cfg = GPTConfig(num_layers=2)
    torch.manual_seed(0)
    model = GPT(cfg)
    x, y = gpt_inputs(cfg, 4)
    ir = _ir(model, (x, y), capture="export")
    assert ir.capture == "export"
    assert dict(ir.gm.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert ir.gm.get_parameter("blocks.0.attn.q.weight") is model.blocks[0].attn.q.weight  # shared, not copied
    assert torch.equal(ir.gm(x, y), model(x, y))
    assert torch.allclose(ir.gm(x[:1], y[:1]), model(x[:1], y[:1]))  # symbolic batch: a dp rank's slice runs
    assert ir.layers == ["pre", "blocks.0", "blocks.1", "post"]
    # every parameter is read right before its first use, so each block's nodes are contiguous
    runs = [ir.meta(n).layer for n in ir.graph.nodes]
    assert [layer for i, layer in enumerate(runs) if i == 0 or runs[i - 1] != layer] == ir.layers
    assert not any(n.op == "call_module" for n in ir.graph.nodes)  # export's input guard is gone


def test_hf_model_falls_back_to_export_with_the_reason_and_cache_note():
    model = llama()
    cm = pcompile.compile(model, pcompile.Cluster.local(2), token_batch(0), plan=Plan.uniform(dp=1, tp=2))
    assert cm.ir.capture == "export"
    assert cm.report[0].startswith("captured with torch.export because torch.fx.symbolic_trace failed: "
                                   "cannot trace module 'model.model' (LlamaModel)")
    assert "use_cache=False during capture" in cm.report[1]
    assert model.model.config.use_cache is True  # the user's config is restored
    assert cm.ir.block_layers == ["model.model.layers.0", "model.model.layers.1"]


def test_meta_device_hf_model_is_captured_and_planned_without_weights():
    with torch.device("meta"):
        model = llama()
    ids = torch.empty(4, 8, dtype=torch.long, device="meta")
    ir = _ir(model, (ids, ids))
    assert ir.capture == "export" and len(ir.block_layers) == 2
    assert all(p.is_meta for p in ir.gm.parameters())
    assert ir.total("flops") > 0 and ir.total("param_bytes") == sum(p.numel() * 4 for p in model.parameters())


class Wrapped(nn.Module):
    """A loss wrapper around a model without repeated blocks."""

    def __init__(self):
        super().__init__()
        self.net = nn.ModuleDict({"stem": nn.Linear(4, 8), "body": nn.Linear(8, 8), "head": nn.Linear(8, 3)})

    def forward(self, x, y):
        return F.cross_entropy(self.net["head"](F.relu(self.net["body"](self.net["stem"](x)))), y)


def test_without_repeated_blocks_layers_are_the_children_inside_a_wrapper():
    ir = _ir(Wrapped(), (torch.randn(4, 4), torch.randint(0, 3, (4,))))
    # net.stem's column Linear and net.body's row partner: one unit (a Megatron pair, passes/layers.py)
    assert ir.layers == ["pre", "net.stem+net.body", "net.head", "post"] and ir.block_layers == []


def _tp_ir(model, inputs, tp=2):
    return pcompile.compile(model, pcompile.Cluster.local(4), inputs, plan=Plan.uniform(dp=4 // tp, tp=tp),
                            stop_after="tensor_parallel")


def test_exported_multihead_attention_is_split_by_heads():
    """nn.MultiheadAttention under export (#17): the packed in_proj [3E, E] in 3 blocks, each
    chunked by tp (self-attention's q / k / v, cross-attention's q and kv pieces of one
    parameter), out_proj row-parallel; nn.Transformer's decoder stack is blocks too."""
    from pcompile.ir.placement import Shard
    from tests.models.structural import StockEncoderDecoder, token_inputs

    ir = _tp_ir(StockEncoderDecoder(), token_inputs(0))
    assert ir.block_layers == [f"transformer.{side}.layers.{i}" for side in ("encoder", "decoder") for i in range(2)]
    for attn in ("encoder.layers.0.self_attn", "decoder.layers.1.self_attn", "decoder.layers.1.multihead_attn"):
        assert ir.param_shardings[f"transformer.{attn}.in_proj_weight"] == Shard("tp", 0, 2, 3), attn
        assert ir.param_shardings[f"transformer.{attn}.in_proj_bias"] == Shard("tp", 0, 2, 3), attn
        assert ir.param_shardings[f"transformer.{attn}.out_proj.weight"] == Shard("tp", 1, 2), attn
    heads = [n for n in ir.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(heads) == 6 and all(ir.meta(n).placement.shards[0].dim == 1 for n in heads)  # [B, H, S, hd]


def test_multihead_attention_with_fewer_heads_than_tp_is_refused_naming_the_layer():
    from tests.models.structural import StockEncoderDecoder, token_inputs

    with pytest.raises(PcompileError) as info:
        _tp_ir(StockEncoderDecoder(), token_inputs(0), tp=4)  # 2 heads
    message = str(info.value)  # the heads view is the first op tp=4 cannot split
    assert "tp=4 cannot split transformer.encoder.layers.0 (view_default: view/reshape" in message, message
    assert "divide the batch, heads and hidden sizes" in message


def test_hf_eager_attention_is_refused_under_bf16_with_the_sdpa_fix():
    from tests.models.zoo import gpt2

    with pytest.raises(PcompileError) as info:
        pcompile.compile(gpt2("eager"), pcompile.Cluster.local(1), token_batch(0), mixed_precision="bf16",
                         stop_after="trace")
    message = str(info.value)
    assert "model (GPT2LMHeadModel) uses Hugging Face's eager attention" in message
    assert "float attention mask" in message and "attn_implementation='sdpa'" in message.split("fix:")[1]
    assert _ir(gpt2("eager"), token_batch(0), stop_after="trace").capture == "export"  # fp32: fine


def test_a_device_move_is_not_recorded_as_a_cast_to_the_capture_dtype():
    """GPT-2's `position_embeds.to(inputs_embeds.device)`: under bf16 a recorded fp32 made the
    residual stream fp32 (the zoo's bf16 case trains it)."""
    from tests.models.zoo import gpt2

    ir = _ir(gpt2(), token_batch(0), stop_after="trace")
    moves = [n for n in ir.graph.nodes if n.target is torch.ops.aten.to.dtype_layout]
    assert moves and all("dtype" not in n.kwargs for n in moves)


class _PackedPieces(nn.Module):
    """One packed [3E, E] weight read as a q piece and a kv piece (nn.MultiheadAttention's
    cross-attention layout), heads attended, an output projection; `leak` also reads the kv
    piece outside a Linear (its local rows would be a shard)."""

    def __init__(self, leak: bool = False, dim: int = 8, heads: int = 2):
        super().__init__()
        self.packed = nn.Parameter(torch.randn(3 * dim, dim) / dim ** 0.5)
        self.out = nn.Linear(dim, dim)
        self.leak, self.dim, self.heads = leak, dim, heads

    def forward(self, x, y):
        wq, wkv = self.packed.split([self.dim, 2 * self.dim])
        b, s, e, h = *x.shape[:2], self.dim, self.heads
        q = F.linear(x, wq).view(b, s, h, e // h).transpose(1, 2)
        k, v = (t.view(b, s, h, e // h).transpose(1, 2) for t in F.linear(x, wkv).chunk(2, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, e)
        loss = F.mse_loss(self.out(o), y)
        return loss + wkv.sum() * 1e-3 if self.leak else loss


def test_a_packed_weight_is_split_only_when_every_piece_is_read_by_a_linear_split_alike():
    from pcompile.ir.placement import Shard

    inputs = (torch.randn(4, 3, 8), torch.randn(4, 3, 8))
    ir = pcompile.compile(_PackedPieces(), pcompile.Cluster.local(2), inputs, plan=Plan.uniform(dp=1, tp=2),
                          capture="export", stop_after="tensor_parallel")
    assert ir.param_shardings["packed"] == Shard("tp", 0, 2, 3)  # q | k | v blocks, each chunked
    with pytest.raises(PcompileError) as info:  # the sum would read this rank's rows of the kv piece
        pcompile.compile(_PackedPieces(leak=True), pcompile.Cluster.local(2), inputs, plan=Plan.uniform(dp=1, tp=2),
                         capture="export", stop_after="tensor_parallel")
    assert "a piece of the packed packed is read by sum_1, not split alike" in str(info.value)
    assert "give this layer tp=1" in str(info.value).split("fix:")[1]


class _WeightsBlock(nn.Module):
    """nn.MultiheadAttention asked for its attention weights (need_weights=True: batched matmuls
    over merged batch x heads, not split by tp), then an MLP."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=True)[0]
        return x + self.down(F.relu(self.up(x)))


class _WeightsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_WeightsBlock() for _ in range(2))

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        return F.mse_loss(x, y)


def test_attention_tp_cannot_split_stays_whole_and_is_reported_while_the_mlp_splits():
    from pcompile.sharding.tp_rules import plan_tensor_parallel

    inputs = (torch.randn(4, 3, 16), torch.randn(4, 3, 16))
    ir = _tp_ir(_WeightsModel(), inputs)
    assert "blocks.0.up.weight" in ir.param_shardings and "blocks.0.attn.in_proj_weight" not in ir.param_shardings
    p, reasons = plan_tensor_parallel(_ir(_WeightsModel(), inputs), {"blocks.0": 2, "blocks.1": 2})
    assert not reasons and set(p.partly) == {"blocks.0", "blocks.1"}, (reasons, p.partly)
    cm = pcompile.compile(_WeightsModel(), pcompile.Cluster.local(2), inputs, plan=Plan.uniform(dp=1, tp=2))
    assert any(line.startswith("tensor parallel: layer blocks.0 (and 1 more layers) split in part, the rest kept "
                               "whole: ") for line in cm.report), cm.report
