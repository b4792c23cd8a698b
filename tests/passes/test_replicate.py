"""Repeated blocks captured and analysed once (pcompile.ir.replicate): the IR after the analyses
is the full path's node for node (names, ops, targets, arguments, module stacks, NodeMeta,
layers) and its GraphModule holds the model's own tensors under the same names; the analyses
run on the 3-block template only; blocks that differ take the full path."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import pcompile
from pcompile.api import PLAN_PIPELINE, _context, _run
from pcompile.ir import replicate
from pcompile.ir.pass_manager import PassManager
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from pcompile.options import CompileOptions
from tests.models.zoo import SEQ, VOCAB, CausalLM, MaskedLM, token_batch


def analysed(model, inputs, capture="auto", full=False):
    """The IR after the analyses (trace .. layers), fast or full path."""
    ctx = _context(model, pcompile.Cluster.local(4), inputs, None, CompileOptions.make(capture))
    manager = PassManager(PLAN_PIPELINE, stop_after="layers")
    if full:
        with replicate.full_analysis():
            return _run(manager, ctx)
    return _run(manager, ctx)


def _row(node: fx.Node):
    name = lambda a: ("node", a.name) if isinstance(a, fx.Node) else a  # noqa: E731
    return (node.name, node.op, str(node.target), repr(fx.node.map_aggregate(node.args, name)),
            repr(fx.node.map_aggregate(node.kwargs, name)), node.type, node.meta.get("nn_module_stack"))


def _tensors(model, gm, kind):
    own = {id(t): k for k, t in getattr(model, kind)(remove_duplicate=False)}
    return [(k, own.get(id(t))) for k, t in getattr(gm, kind)(remove_duplicate=False)]


def assert_same_ir(fast, full, model):
    a, b = list(fast.graph.nodes), list(full.graph.nodes)
    assert [_row(n) for n in a] == [_row(n) for n in b]
    assert [fast.meta(n) for n in a] == [full.meta(n) for n in b]
    assert (fast.layers, fast.block_layers, fast.capture) == (full.layers, full.block_layers, full.capture)
    assert fast.gm.code == full.gm.code and type(fast.gm).__mro__[1:] == type(full.gm).__mro__[1:]
    for kind in ("named_parameters", "named_buffers"):  # the model's own tensors, same names, same order
        assert _tensors(model, fast.gm, kind) == _tensors(model, full.gm, kind)
        assert all(owner is not None for _, owner in _tensors(model, fast.gm, kind))
    assert [k for k, _ in fast.gm.named_modules()] == [k for k, _ in full.gm.named_modules()]
    assert list(fast.gm.state_dict()) == list(full.gm.state_dict())
    assert set(vars(fast.gm)) == set(vars(full.gm))


def _hf(family: str, layers: int = 5):
    import transformers as hf

    if family == "gpt2":
        cfg = hf.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=layers, n_head=4, n_inner=64,
                            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return CausalLM(hf.GPT2LMHeadModel(cfg))
    if family == "llama":
        cfg = hf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return CausalLM(hf.LlamaForCausalLM(cfg))
    cfg = hf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0)
    return MaskedLM(hf.BertForMaskedLM(cfg))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_gpt_fast_analysis_equals_the_full_one(capture):
    cfg = GPTConfig(num_layers=12)  # two-digit block indices: blocks.1 is not blocks.11
    model, inputs = GPT(cfg), gpt_inputs(cfg, 4)
    fast, full = analysed(model, inputs, capture), analysed(model, inputs, capture, full=True)
    assert fast.replicas is not None and full.replicas is None
    assert fast.replicas.blocks == 12 and fast.replicas.captured == 3
    assert_same_ir(fast, full, model)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_huggingface_fast_analysis_equals_the_full_one(family):
    pytest.importorskip("transformers")
    model, inputs = _hf(family), token_batch(0)
    fast, full = analysed(model, inputs), analysed(model, inputs, full=True)
    assert fast.capture == "export" and fast.replicas is not None
    assert_same_ir(fast, full, model)


def test_a_meta_model_is_stitched_with_its_meta_parameters():
    cfg = GPTConfig(num_layers=5)
    with torch.device("meta"):
        model = GPT(cfg)
    inputs = tuple(torch.zeros(4, cfg.seq_len, dtype=torch.long, device="meta") for _ in range(2))
    fast, full = analysed(model, inputs), analysed(model, inputs, full=True)
    assert fast.replicas is not None
    assert_same_ir(fast, full, model)


def test_the_analyses_run_on_the_three_block_template_only(monkeypatch):
    from pcompile.passes import flops, memory, shapes

    runs = []
    for module in (shapes, flops, memory):
        original = module.fake_run
        monkeypatch.setattr(module, "fake_run", lambda ir, *a, _f=original, **k: (runs.append(len(ir.graph.nodes)),
                                                                                   _f(ir, *a, **k))[1])
    cfg = GPTConfig(num_layers=24)
    ir = analysed(GPT(cfg), gpt_inputs(cfg, 2))
    template = len(ir.replicas.gm.graph.nodes)
    assert runs == [template] * 3 and template < len(ir.graph.nodes) / 5


class Scaled(nn.Module):
    """A block whose forward depends on its index beyond a counter: block 2 is not block 1 moved."""

    def __init__(self, index: int):
        super().__init__()
        self.fc, self.index = nn.Linear(8, 8), index

    def forward(self, x):
        return x + self.fc(x) * (self.index % 2)


class Alternating(nn.Module):
    """Blocks whose plain attributes differ (not a counter): their modules differ."""

    def __init__(self, index: int):
        super().__init__()
        self.fc, self.kind = nn.Linear(8, 8), "even" if index % 2 == 0 else "odd"

    def forward(self, x):
        return x + self.fc(x) if self.kind == "even" else x - self.fc(x)


class Stack(nn.Module):
    def __init__(self, block, n: int = 6):
        super().__init__()
        self.blocks = nn.ModuleList([block(i) for i in range(n)])

    def forward(self, x, y):
        for b in self.blocks:
            x = b(x)
        return F.mse_loss(x, y)


@pytest.mark.parametrize("block", [Scaled, Alternating])
def test_blocks_that_differ_take_the_full_path(block):
    model, inputs = Stack(block), (torch.randn(4, 8), torch.randn(4, 8))
    assert (replicate.repeated_blocks(model) is None) == (block is Alternating)
    fast, full = analysed(model, inputs), analysed(model, inputs, full=True)
    assert fast.replicas is None
    assert_same_ir(fast, full, model)


def test_few_blocks_and_several_containers_take_the_full_path():
    assert replicate.repeated_blocks(MLPModel(MLPConfig(num_layers=3))) is None  # nothing to save
    assert replicate.repeated_blocks(MLPModel(MLPConfig(num_layers=4))) == ("blocks", 4)
    model, inputs = MLPModel(MLPConfig(num_layers=4)), mlp_inputs(MLPConfig(), 8)
    assert_same_ir(analysed(model, inputs), analysed(model, inputs, full=True), model)


def test_the_container_is_restored_after_the_capture():
    cfg = GPTConfig(num_layers=6)
    model = GPT(cfg)
    analysed(model, gpt_inputs(cfg, 2))
    assert len(model.blocks) == 6
