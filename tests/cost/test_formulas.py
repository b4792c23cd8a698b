"""Hand-computed cases of the cost model's formulas."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import pcompile
from pcompile.cost.layer_work import layer_work
from pcompile.cost.pricing import (
    CostOptions,
    _stage_sync,
    cost_table,
    estimate_uniform,
    layer_cost,
    ring_allreduce_time,
    sdp_transient,
    sdp_units,
    switch_time,
    sync_buckets,
)
from pcompile.mesh import stage_groups
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.plan import Strategy
from pcompile.search.schedules import StageCost, simulate
from tests.cost.conftest import OneLinear, analyse


@pytest.fixture(scope="module")
def linear_ir():
    return analyse(OneLinear(12, 5), (torch.randn(4, 12), torch.randn(4, 5)))[0]


def _fc_row(table, ir):
    fc = next(n for n in ir.graph.nodes if n.target == "fc")
    return table.layers.index(ir.meta(fc).layer)


def test_linear_params_grads_adam_bytes(linear_ir):
    elements = 12 * 5 + 5
    s = [Strategy(dp=1, tp=1), Strategy(dp=2, tp=1, sdp=True)]
    fp32 = cost_table(linear_ir, pcompile.Cluster.local(1), 1, 4, s[:1])
    assert fp32.state_memory[_fc_row(fp32, linear_ir), 0] == elements * (4 + 4 + 8)  # param + grad + Adam m, v
    sgd = cost_table(linear_ir, pcompile.Cluster.local(1), 1, 4, s[:1], CostOptions(optimizer="sgd"))
    assert sgd.state_memory[_fc_row(sgd, linear_ir), 0] == elements * (4 + 4)
    mixed = cost_table(linear_ir, pcompile.Cluster.local(1), 1, 4, s[:1],
                       CostOptions(mixed_precision=True, optimizer="sgd"))
    # bf16 param, fp32 master grad and weight
    assert mixed.state_memory[_fc_row(mixed, linear_ir), 0] == elements * (2 + 4 + 4)
    zero3 = cost_table(linear_ir, pcompile.Cluster.local(2), 2, 4, s[1:])
    # one micro-batch: the shards' gradients appear in backward as activations go (table_entries)
    assert zero3.state_memory[_fc_row(zero3, linear_ir), 0] == elements * (4 + 8) / 2
    accumulating = cost_table(linear_ir, pcompile.Cluster.local(2), 2, 4, s[1:], CostOptions(accumulating=True))
    assert accumulating.state_memory[_fc_row(accumulating, linear_ir), 0] == elements * 16 / 2


def test_linear_saved_activation_is_its_input(linear_ir):
    table = cost_table(linear_ir, pcompile.Cluster.local(2), 2, 8, [Strategy(dp=2, tp=1)])
    # the Linear saves its input x, the loss its input and the targets: 8 samples / dp 2 = 4 rows each
    x, y = 4 * 12 * 4, 4 * 5 * 4
    assert table.activation_memory[_fc_row(table, linear_ir), 0] == x + y + y


def test_ring_all_reduce_time():
    cluster = pcompile.Cluster.local(4)
    n, nbytes = 4, 8e6
    bw, lat = cluster.intra_node_bandwidth, cluster.intra_node_latency
    expected = 2 * (n - 1) * lat + 2 * (n - 1) / n * nbytes / bw
    assert math.isclose(ring_allreduce_time(nbytes, n, bw, lat), expected)
    assert math.isclose(cluster.collective_time("all_reduce", nbytes, [[0, 1, 2, 3]]), expected)
    assert math.isclose(cluster.collective_time("all_gather", nbytes, [[0, 1, 2, 3]]), expected / 2)


def test_groups_across_nodes_use_the_inter_node_link():
    cluster = pcompile.Cluster.preset("2x8xA100-80GB")
    inside = cluster.collective_time("all_reduce", 1e9, [[0, 1]])
    across = cluster.collective_time("all_reduce", 1e9, [[7, 8]])
    assert math.isclose(inside, 2 * 5e-6 + 1e9 / 200e9)  # nccl-tests busbw (cluster.py)
    assert math.isclose(across, 2 * 10e-6 + 1e9 / 24e9)  # 96% of 200 Gb/s HDR
    # tp innermost: on 16 devices with tp=8 the tp groups fill a node, the dp groups (ranks 8 apart) span two
    tp_groups, dp_groups = stage_groups(0, 2, 8)
    assert {cluster.link_kind(g) for g in tp_groups} == {"intra"}
    assert {cluster.link_kind(g) for g in dp_groups} == {"inter"}
    assert stage_groups(4, 2, 2) == ([[4, 5], [6, 7]], [[4, 6], [5, 7]])


def test_one_f_one_b_bubble_hand_computed():
    f, b, pp, m = 1.0, 2.0, 4, 8
    stages = [StageCost(f, b) for _ in range(pp)]
    for schedule in ("GPipe", "1F1B"):
        assert math.isclose(simulate(schedule, stages, m).step_time, (m + pp - 1) * (f + b))
    interleaved = simulate("Interleaved1F1B", stages, m, chunks=2).step_time
    assert math.isclose(interleaved, m * (f + b) + (pp - 1) * (f + b) / 2)
    # two stages, one micro-batch, sends of c each way: F0 c F1 B1 c B0
    c = 0.25
    two = simulate("1F1B", [StageCost(f, b, send=c), StageCost(f, b, send=c)], 1)
    assert math.isclose(two.step_time, 2 * f + 2 * b + 2 * c)
    with_sync = simulate("1F1B", [StageCost(f, b, sync=0.5), StageCost(f, b)], 1)
    assert math.isclose(with_sync.step_time, 2 * f + 2 * b + 0.5)


def test_gpipe_holds_every_micro_batch_1f1b_only_pp_minus_stage():
    pp, m, act = 4, 8, 100.0
    stages = [StageCost(1.0, 2.0, state_memory=10.0, activation_memory=act) for _ in range(pp)]
    gpipe = simulate("GPipe", stages, m)
    one = simulate("1F1B", stages, m)
    assert gpipe.in_flight == (m,) * pp
    assert one.in_flight == tuple(min(pp - s, m) for s in range(pp))
    assert one.peak_memory[0] == 10.0 + pp * act < gpipe.peak_memory[0] == 10.0 + m * act
    interleaved = simulate("Interleaved1F1B", stages, m, chunks=2)  # Megatron: pp (1 + (pp-1)/(pp v)) on stage 0
    assert math.isclose(interleaved.in_flight[0], pp * (1 + (pp - 1) / (pp * 2)))
    with pytest.raises(pcompile.PcompileError, match="multiple of pp"):
        simulate("Interleaved1F1B", stages, 6, chunks=2)


def test_switching_strategy_costs_one_all_gather(gpt_ir):
    ir, _ = gpt_ir
    cluster = pcompile.Cluster.local(4)
    a, b = Strategy(dp=4, tp=1), Strategy(dp=2, tp=2)
    table = cost_table(ir, cluster, 4, 8, [a, b])
    nbytes = table.boundary_bytes[1]
    assert nbytes == 8 * 32 * 64 * 4  # the residual stream of blocks.0 -> blocks.1
    expected = cluster.collective_time("all_gather", nbytes / 2, [[0, 1], [2, 3]])
    assert table.switch_time[1, 0, 0] == table.switch_time[1, 1, 1] == 0.0
    assert math.isclose(table.switch_time[1, 0, 1], expected)
    assert math.isclose(table.switch_time[1, 1, 0], switch_time(cluster, nbytes, b, a, 0))


def test_impossible_pairs_cost_infinity(gpt_ir):
    ir, _ = gpt_ir
    table = cost_table(ir, pcompile.Cluster.local(4), 4, 6,
                       [Strategy(dp=4, tp=1), Strategy(dp=2, tp=2), Strategy(dp=1, tp=2)])
    assert math.isinf(table.fwd_time[1, 0])  # 6 samples over dp=4
    assert math.isfinite(table.fwd_time[1, 1])
    assert math.isinf(table.fwd_time[1, 2])  # 2 devices, stage has 4


@pytest.fixture(scope="module")
def untied_gpt_ir():
    cfg = GPTConfig(tie_head=False)
    return analyse(GPT(cfg), gpt_inputs(cfg, 8))[0]


def test_vocab_parallel_state_is_the_vocab_shard(gpt_ir, untied_gpt_ir):
    """GPT: tok_emb [256, 64], pos_emb [32, 64] (indexed by positions: stays whole), ln_f 2 x 64,
    head [256, 64] tied to tok_emb or not. Adam fp32: 16 bytes per element."""
    tok, pos, ln_f, head = 256 * 64, 32 * 64, 2 * 64, 256 * 64
    for ir, tied in ((gpt_ir[0], True), (untied_gpt_ir, False)):
        state = {tp: cost_table(ir, pcompile.Cluster.local(tp), tp, 8, [Strategy(dp=1, tp=tp)]).state_memory[:, 0]
                 for tp in (1, 2)}
        pre, post = ir.layers.index("pre"), ir.layers.index("post")
        assert state[1][pre] == (tok + pos) * 16
        assert state[2][pre] == (tok // 2 + pos) * 16  # the tied table once, in "pre", as at tp=1
        assert state[1][post] == (ln_f + (0 if tied else head)) * 16
        assert state[2][post] == (ln_f + (0 if tied else head // 2)) * 16


def test_vocab_parallel_collectives_are_charged(gpt_ir):
    ir = gpt_ir[0]
    b, s, h, cluster, strategy = 8, 32, 64, pcompile.Cluster.local(2), Strategy(dp=1, tp=2)
    works = layer_work(ir, 2)
    pre, post = works["pre"], works["post"]
    assert pre.reduce_fwd == (b * s * h * 4,)  # the embedding's partial lookups, fp32
    assert post.loss_fwd == (b * s * 4,) * 3  # max, sum of exp, target logit: one fp32 per row
    for options, act in ((CostOptions(), 1.0), (CostOptions(mixed_precision=True), 0.5)):
        def fwd(work):
            return layer_cost(work, cluster, strategy, b, b, options).fwd

        # the embedding's tp_reduce: the all-reduce plus collectives._all_reduce's clone of its
        # input (read + write at the device bandwidth); the loss vectors are reduced in place
        nbytes = b * s * h * 4 * act
        embedding = cluster.collective_time("all_reduce", nbytes, [[0, 1]]) + 2 * nbytes / 10e9
        assert math.isclose(fwd(pre) - fwd(dataclasses.replace(pre, reduce_fwd=())), embedding)
        loss = 3 * cluster.collective_time("all_reduce", b * s * 4, [[0, 1]])  # fp32 under mixed precision too
        assert math.isclose(fwd(post) - fwd(dataclasses.replace(post, loss_fwd=())), loss)
        no_backward = layer_cost(dataclasses.replace(post, loss_fwd=()), cluster, strategy, b, b, options).bwd
        assert layer_cost(post, cluster, strategy, b, b, options).bwd == no_backward


def test_sync_buckets_pack_whole_tensors_until_full_in_backward_order():
    # 4-byte elements, 100-byte buckets, the last tensors first (backward makes them first):
    # 120 closes the first, 20 + 80 the second, 40 is left
    assert sync_buckets([10, 20, 5, 30], 4.0, 100) == [120.0, 100.0, 40.0]
    assert sync_buckets([10, 5], 4.0, 100) == [60.0]


def test_dp_sync_needs_no_memory_beyond_the_gradients():
    ir = analyse(OneLinear(64, 64), (torch.randn(2, 64), torch.randn(2, 64)))[0]
    cluster = pcompile.Cluster.local(2)
    sgd = dict(optimizer="sgd")

    def peak(strategy, bucket):
        return estimate_uniform(ir, cluster, strategy, CostOptions(bucket_bytes=bucket, **sgd)).peak_memory

    # the gradients are views into the buckets (pcompile.runtime.grad_sync): bucketing is free
    assert peak(Strategy(dp=2), 2**20) == peak(Strategy(dp=2), None)
    assert peak(Strategy(dp=1, tp=2), 2**20) == peak(Strategy(dp=1, tp=2), None)


def test_zero3_transient_is_the_runtimes_stated_backward_peak():
    ir = analyse(OneLinear(64, 64), (torch.randn(2, 64), torch.randn(2, 64)))[0]
    cluster = pcompile.Cluster.local(4)
    layer = ir.meta(next(n for n in ir.graph.nodes if n.target == "fc")).layer
    work = layer_work(ir, 1)[layer]
    unit = 4.0 * (64 * 64 + 64)  # fp32 parameters of the layer's one unit
    for dp in (2, 4):
        sharded, plain = (layer_cost(work, cluster, s, 4, 2, CostOptions()).memory
                          for s in (Strategy(dp=dp, sdp=True), Strategy(dp=dp)))
        # U + G + (U + G)(1 + 1/dp): the unit and its gradients, the neighbours' collectives in
        # flight - less the activations of the unit whose gradients are reduce-scattered (freed)
        kept = plain.activations
        assert 0 < kept < unit
        assert sharded.temp - plain.temp == sdp_transient(unit, unit, dp, kept) == unit * (4 + 2 / dp) - kept
        assert sdp_transient(unit, unit, dp, 10 * unit) == unit * (3 + 1 / dp)  # at most the scatter's bytes


def test_sdp_units_are_what_the_zero3_rewrite_gathers(gpt_ir):
    ir, _ = gpt_ir
    H, V, S = 64, 256, 32  # GPTConfig(): hidden, vocabulary (head tied to the embedding), sequence
    work = layer_work(ir, 1)
    ln, attn, fc, out = 2 * H, H * H + H, 4 * H * H + 4 * H, 4 * H * H + H
    # unsplit: one unit per layer; the embeddings' backward needs no weight (no re-gather), the
    # last layer's unit is kept from forward; the tied head weight is charged to 'pre' only
    assert sdp_units(work["pre"], 1) == [(V * H + S * H, False)]
    assert sdp_units(work["blocks.0"], 1) == [(2 * ln + 4 * attn + fc + out, True)]
    assert sdp_units(work["post"], 1) == [(ln, False)]
    # split 2: one unit per op, a Linear two of half its elements (q, k, v, proj, fc, out)
    def halves(n):
        return [(n / 2, True)] * 2
    assert sdp_units(work["blocks.0"], 2) == ([(ln, True)] + halves(attn) * 4 + [(ln, True)]
                                              + halves(fc) + halves(out))
    assert sdp_units(work["pre"], 2) == [(V * H, False), (S * H, False)]
    # the head reads the tied table in pieces; its last piece is the graph's last unit
    assert sdp_units(work["post"], 2) == [(ln, True), (V * H / 2, True), (V * H / 2, False)]


def test_sdp_collectives_per_unit(gpt_ir):
    ir, _ = gpt_ir
    cluster = pcompile.Cluster.local(2)
    work = layer_work(ir, 1)["blocks.0"]
    s = Strategy(dp=2, sdp=True, split=2)
    options = CostOptions(overlap=0.0)
    cost, plain = (layer_cost(work, cluster, st, 8, 8, options) for st in (s, Strategy(dp=2)))
    units = sdp_units(work, 2)
    def t(op, n):  # fp32 shards
        return cluster.collective_time(op, 4.0 * n, [[0, 1]])
    gather = sum(t("all_gather", n) for n, _ in units)
    scatter = sum(t("reduce_scatter", n) for n, _ in units)
    assert math.isclose(cost.comm, gather + gather + scatter)  # every unit of a block is re-gathered
    assert math.isclose(cost.fwd - plain.fwd, gather, rel_tol=1e-9, abs_tol=1e-3 * gather)
    # checkpointed: the recompute gathers again instead of the re-gather
    ckpt = layer_cost(work, cluster, dataclasses.replace(s, checkpoint=True), 8, 8, options)
    assert math.isclose(ckpt.comm, gather + gather + scatter)
    assert math.isclose(ckpt.bwd - ckpt.fwd, cost.bwd - gather, rel_tol=1e-9)


def test_uniform_estimate_charges_the_loss_all_reduce_over_dp(linear_ir):
    cluster = pcompile.Cluster.local(2)
    dp, tp = (estimate_uniform(linear_ir, cluster, s) for s in (Strategy(dp=2), Strategy(dp=1, tp=2)))
    layers = [layer_cost(w, cluster, Strategy(dp=2), 4, 4, CostOptions()) for w in layer_work(linear_ir, 1).values()]
    loss = cluster.collective_time("all_reduce", 4.0, [[0, 1]])  # the fp32 loss, averaged over dp
    assert math.isclose(dp.comm_time, sum(c.sync + c.comm for c in layers) + loss)
    assert tp.comm_time == sum(c.comm for c in (layer_cost(w, cluster, Strategy(dp=1, tp=2), 4, 4, CostOptions())
                                                for w in layer_work(linear_ir, 2).values()))


def test_bucketed_dp_sync_is_a_share_of_a_bucket_plus_the_in_place_divide(linear_ir):
    cluster = pcompile.Cluster.local(2)
    work = layer_work(linear_ir, 1)[linear_ir.meta(next(n for n in linear_ir.graph.nodes if n.target == "fc")).layer]
    plain, bucketed = (layer_cost(work, cluster, Strategy(dp=2), 4, 4, CostOptions(overlap_grad_sync=False,
                                                                                      bucket_bytes=b))
                       for b in (None, 2**20))
    grad_bytes = (12 * 5 + 5) * 4.0
    assert math.isclose(plain.sync, cluster.collective_time("all_reduce", 12 * 5 * 4.0, [[0, 1]])
                        + cluster.collective_time("all_reduce", 5 * 4.0, [[0, 1]]))  # one per tensor
    # the layer's share of the stage's shared 1 MiB buckets: its bytes / 1 MiB of one bucket's all-reduce
    share = grad_bytes / 2**20 * cluster.collective_time("all_reduce", 2**20, [[0, 1]])
    assert math.isclose(bucketed.sync, share + 2 * grad_bytes / cluster.device_of(0).memory_bandwidth)


def test_uniform_estimate_buckets_the_whole_stage(gpt_ir):
    ir, _ = gpt_ir
    cluster = pcompile.Cluster.local(2)
    options = CostOptions(overlap_grad_sync=False, bucket_bytes=2**20)
    estimate = estimate_uniform(ir, cluster, Strategy(dp=2), options)
    grads = 4.0 * sum(n for w in layer_work(ir, 1).values() for n in w.param_numels)  # < 1 MiB: one bucket
    one = cluster.collective_time("all_reduce", grads, [[0, 1]])
    divide = 2 * grads / cluster.device_of(0).memory_bandwidth
    loss = cluster.collective_time("all_reduce", 4.0, [[0, 1]])
    assert math.isclose(estimate.comm_time, one + divide + loss)  # one all-reduce, not one per layer


def test_overlapped_stage_sync_exposes_what_runs_past_backward(gpt_ir):
    ir, _ = gpt_ir
    cluster = pcompile.Cluster.local(2)
    numels = [n for w in layer_work(ir, 1).values() for n in w.param_numels]
    bucket = 64 * 2**10  # several buckets
    sizes = sync_buckets(numels, 4.0, bucket)
    times = [cluster.collective_time("all_reduce", b, [[0, 1]]) for b in sizes]
    divide = 2 * sum(sizes) / cluster.device_of(0).memory_bandwidth

    def sync(backward, eta, overlap=True):
        options = CostOptions(bucket_bytes=bucket, overlap=eta, overlap_grad_sync=overlap)
        return _stage_sync(cluster, Strategy(dp=2), options, numels, backward) - divide

    assert len(sizes) > 2 and sizes[0] <= 2**20
    assert math.isclose(sync(1e-3, 1.0, overlap=False), sum(times))
    assert math.isclose(sync(0.0, 1.0), sum(times))  # no backward to hide behind
    assert math.isclose(sync(1e3, 1.0), times[-1])  # a long backward: the last bucket alone
    assert math.isclose(sync(1e3, 0.0), sum(times))  # no overlap efficiency: the sum
    assert math.isclose(sync(1e3, 0.5), 0.5 * sum(times) + 0.5 * times[-1])
