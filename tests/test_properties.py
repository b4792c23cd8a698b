"""Property tests (hypothesis, in-process, fast) over random MLP and GPT configs:

- per-layer FLOPs sum to the whole model's FlopCounterMode total, measured on the original
  (untraced) model under FakeTensorMode with the *math* SDPA kernel forced, so attention is
  counted as its two batched matmuls there and by formula in the flops pass: the totals must
  be equal, attention included;
- parameter bytes add up to the model's size (tied weights once);
- the printed IR parses back to the graph's node list;
- for every tp dividing the heads and widths, the tensor-parallel rewrite succeeds (its own
  local-shape check runs on fake tensors) with one tp_copy/tp_reduce pair per Megatron pair.
"""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pcompile
from pcompile import Cluster, Plan
from pcompile.ir import IR, target_name
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from tests.passes.test_flops import reference_flops

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def gpt_configs(draw, min_layers: int = 1):
    heads = draw(st.sampled_from([1, 2, 4]))
    return GPTConfig(vocab_size=draw(st.sampled_from([16, 24, 64])), seq_len=draw(st.sampled_from([4, 8, 12])),
                     hidden=heads * draw(st.sampled_from([4, 8])), num_heads=heads,
                     num_layers=draw(st.integers(min_layers, 3)), mlp_ratio=draw(st.sampled_from([1, 2, 4])),
                     tie_head=draw(st.booleans()))


@st.composite
def mlp_configs(draw, min_layers: int = 1):
    return MLPConfig(width=draw(st.sampled_from([4, 8, 12])), hidden=draw(st.sampled_from([8, 16, 24])),
                     num_layers=draw(st.integers(min_layers, 3)), num_classes=draw(st.sampled_from([2, 5])))


def build(kind: str, cfg, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "gpt":
        return GPT(cfg), gpt_inputs(cfg, batch, seed)
    return MLPModel(cfg), mlp_inputs(cfg, batch, seed)


models = st.one_of(st.tuples(st.just("gpt"), gpt_configs()), st.tuples(st.just("mlp"), mlp_configs()))


@SETTINGS
@given(model=models, batch=st.integers(1, 4))
def test_layer_flops_sum_to_flop_counter_total(model, batch):
    kind, cfg = model
    module, inputs = build(kind, cfg, batch)
    ir = pcompile.compile(module, Cluster.local(1), inputs, stop_after="layers")
    per_layer = [ir.total("flops", layer) for layer in ir.layers]
    assert sum(per_layer) == ir.total("flops") == reference_flops(module, inputs, math_sdpa=True)
    assert all(ir.meta(n).bwd_flops == 2 * ir.meta(n).flops for n in ir.graph.nodes)
    if kind == "gpt" and len(ir.block_layers) > 1:
        blocks = [ir.total("flops", b) for b in ir.block_layers]
        assert len(set(blocks)) == 1  # identical blocks cost the same
    assert ir.total("param_bytes") == sum(p.numel() * p.element_size() for p in module.parameters())


@SETTINGS
@given(model=models)
def test_printed_ir_parses_back(model):
    kind, cfg = model
    module, inputs = build(kind, cfg, 2)
    ir = pcompile.compile(module, Cluster.local(1), inputs, stop_after="layers")
    text = ir.format()
    assert IR.parse(text) == [(n.name, n.op, target_name(n)) for n in ir.graph.nodes]
    assert len(text.splitlines()) == len(ir.graph.nodes) + 1


@SETTINGS
@given(cfg=gpt_configs(min_layers=2), tp=st.sampled_from([2, 4]))
def test_tp_rewrite_of_random_gpts(cfg, tp):
    if cfg.num_heads % tp:
        tp = cfg.num_heads if cfg.num_heads > 1 else 1
    module, inputs = build("gpt", cfg, 2)
    ir = pcompile.compile(module, Cluster.local(tp), inputs, plan=Plan.uniform(tp=tp), stop_after="tensor_parallel")
    counts = ir.op_counts()
    copies = counts.get("call_function:pcompile.runtime.collectives.tp_copy", 0)
    reduces = counts.get("call_function:pcompile.runtime.collectives.tp_reduce", 0)
    # Megatron pairs per block; vocab parallelism adds the LM head's copy and the embedding's
    # reduce (and shards the token table, tied or not) when tp divides the vocabulary
    vocab = int(tp > 1 and cfg.vocab_size % tp == 0)
    assert (copies, reduces) == ((2 * cfg.num_layers + vocab,) * 2 if tp > 1 else (0, 0))
    if tp > 1:
        assert len(ir.param_shardings) == cfg.num_layers * 10 + 2 * vocab
    assert IR.parse(ir.format()) == [(n.name, n.op, target_name(n)) for n in ir.graph.nodes]
