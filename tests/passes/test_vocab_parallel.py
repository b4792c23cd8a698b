"""Vocab parallelism in the IR (embedding -> vocab_embedding -> tp_reduce, LM head column-
parallel, cross-entropy -> vocab_parallel_cross_entropy, one sharding for a tied table) and
the run-time functions against torch's on 2 gloo ranks (pcompile/runtime/vocab_parallel.py)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

import pcompile
from pcompile import Plan
from pcompile.ir import Shard
from pcompile.ir.fake import fake_run
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.runtime import collectives
from pcompile.runtime.vocab_parallel import vocab_embedding, vocab_parallel_cross_entropy, vocab_start
from pcompile.sharding.tp_rules import plan_tensor_parallel
from tests.distributed.ranks import gap
from tests.models import zoo
from tests.toy import analyse, node, rows


def _gpt(tp: int, vocab: int = 256, tie: bool = True, stop_after: str = "tensor_parallel"):
    cfg = GPTConfig(vocab_size=vocab, tie_head=tie)
    return analyse(GPT(cfg), gpt_inputs(cfg, 4), stop_after=stop_after, devices=tp, plan=Plan.uniform(tp=tp))


def test_tied_gpt_ir_has_vocab_embedding_reduce_and_parallel_loss():
    ir = _gpt(tp=2)
    emb = node(ir, "vocab_embedding")
    assert emb.args == (node(ir, "idx"), node(ir, "tok_emb_weight"), node(ir, "vocab_start"), None)
    assert node(ir, "vocab_start").args == ("tp", 2, 128)  # this rank's first row: rank * 256 / 2
    (reduce,) = emb.users
    assert reduce.target is collectives.tp_reduce and reduce.args[1:] == ("tp", 2)
    assert node(ir, "pos_emb").op == "call_module"  # positions: a small table, kept whole
    head = node(ir, "head")
    assert head.args[0].target is collectives.tp_copy
    loss = node(ir, "vocab_parallel_cross_entropy")
    assert loss.args[2:] == ("tp", 2, -100, "mean") and loss.args[0].name == "flatten"
    assert [n for n in ir.graph.nodes if n.op == "output"][0].args[0] is loss
    r = rows(ir)
    assert [r[n][-1] for n in ("tok_emb_weight", "vocab_embedding", reduce.name, "head", "flatten",
                               "vocab_parallel_cross_entropy")] == ["S(0)@tp", "P@tp", "R", "S(2)@tp", "S(1)@tp", "R"]
    # the tied table: one sharding, under both of its names
    assert ir.param_shardings["tok_emb.weight"] == ir.param_shardings["head.weight"] == Shard("tp", 0, 2)
    assert "pos_emb.weight" not in ir.param_shardings
    # the costs of the replaced embedding stay on the node doing its work
    assert ir.meta(emb).param_bytes == 0 and ir.meta(node(ir, "tok_emb_weight")).param_bytes == 256 * 64 * 4


def test_local_shapes_on_fake_tensors():
    ir = _gpt(tp=4)
    shapes = {}

    def record(n, value):
        if isinstance(value, torch.Tensor):
            shapes[n.name] = tuple(value.shape)

    def shard(name, shape):
        return ir.param_shardings[name].local_shape(shape) if name in ir.param_shardings else shape

    with collectives.simulate():
        fake_run(ir, gpt_inputs(GPTConfig(), 4), record, shard=shard, grad=False)
    assert shapes["tok_emb_weight"] == (64, 64)  # 256 / 4 rows
    assert shapes["vocab_embedding"] == shapes["tp_reduce_4"] == (4, 32, 64)  # the full lookup (partial sums)
    assert shapes["head"] == (4, 32, 64) and shapes["flatten"] == (128, 64)  # a quarter of the logits
    assert shapes["vocab_parallel_cross_entropy"] == ()


def test_indivisible_vocabulary_and_disagreeing_readers_keep_the_table_whole():
    ir = _gpt(tp=4, vocab=250, stop_after="layers")
    p, _ = plan_tensor_parallel(ir, {layer: 4 for layer in ir.layers})
    assert not p.embeddings and not p.losses
    assert p.notes == ["embedding tok_emb kept replicated: its 250 rows (the vocabulary) are not divisible by tp=4"]
    # tied table, embedding layer split but the head's layer not: the embedding stays whole too
    ir = _gpt(tp=2, stop_after="layers")
    p, _ = plan_tensor_parallel(ir, {layer: 1 if layer == "post" else 2 for layer in ir.layers})
    assert not p.embeddings and len(p.notes) == 1 and p.notes[0].startswith("tok_emb.weight kept whole")
    # untied: each reader decides alone
    ir = _gpt(tp=2, tie=False, stop_after="layers")
    p, _ = plan_tensor_parallel(ir, {layer: 1 if layer == "post" else 2 for layer in ir.layers})
    assert [n.name for n in p.embeddings] == ["tok_emb"] and not p.losses and not p.notes


def test_exported_gpt2_uses_aten_embedding_and_cross_entropy_loss():
    build, batch = zoo.MODELS["gpt2"]
    ir = analyse(build(), batch(0), stop_after="tensor_parallel", devices=2, plan=Plan.uniform(tp=2))
    emb, loss = node(ir, "vocab_embedding"), node(ir, "vocab_parallel_cross_entropy")
    assert emb.args[1].target == "model.lm_head.weight" and emb.args[3] is None
    assert emb.args[2].args == ("tp", 2, 48)
    assert loss.args[2:] == ("tp", 2, -100, "mean")  # HF's shifted labels pad with -100
    counts = ir.op_counts()
    assert counts["call_function:torch.ops.aten.embedding.default"] == 1  # wpe, the positions' table
    assert not any("cross_entropy_loss" in k for k in counts)
    assert (ir.param_shardings["model.lm_head.weight"] == ir.param_shardings["model.transformer.wte.weight"]
            == Shard("tp", 0, 2))


# -- run-time functions on 2 gloo ranks --------------------------------------------------------
def _check_functions() -> float:
    """Worst difference of loss and gradients against torch, on this rank's half of the vocabulary."""
    collectives.bind_group("vp-test", dist.group.WORLD)
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    cases = [((12, 10), (12,)), ((3, 10, 4), (3, 4))]  # [N, V] and [b, V, s] (class dim 1)
    for (shape, target_shape) in cases:
        for reduction in ("mean", "sum", "none"):
            logits = torch.randn(shape, generator=g) * 3
            target = torch.randint(0, 10, target_shape, generator=g)
            target.view(-1)[::3] = -100
            full = logits.clone().requires_grad_()
            expected = F.cross_entropy(full, target, reduction=reduction)
            local = logits.chunk(size, dim=1)[rank].clone().requires_grad_()
            got = vocab_parallel_cross_entropy(local, target, "vp-test", size, -100, reduction)
            weights = torch.rand(expected.shape, generator=g)  # a non-uniform upstream gradient
            (expected * weights).sum().backward()
            (got * weights).sum().backward()
            worst = max(worst, gap(got, expected), gap(local.grad, full.grad.chunk(size, dim=1)[rank]))
    table = torch.randn(10, 6, generator=g)
    ids = torch.randint(0, 10, (3, 5), generator=g)
    for padding in (None, 7):
        full = table.clone().requires_grad_()
        local = table.chunk(size)[rank].clone().requires_grad_()
        expected = F.embedding(ids, full, padding_idx=padding)
        start = vocab_start("vp-test", size, 10 // size)
        got = collectives.tp_reduce(vocab_embedding(ids, local, start, padding), "vp-test", size)
        expected.pow(2).sum().backward()
        got.pow(2).sum().backward()
        worst = max(worst, gap(got, expected), gap(local.grad, full.grad.chunk(size)[rank]))
    return worst


def test_parallel_cross_entropy_and_embedding_match_torch_on_two_ranks():
    for worst in pcompile.launch(_check_functions, 2):
        assert worst < 1e-5
