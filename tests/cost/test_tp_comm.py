"""tp collectives are charged as the runtime runs them: the fitted collective, the copies
pcompile.runtime.collectives makes around it, and the profiled wake-up cost after compute."""
from __future__ import annotations

import dataclasses
import json
import math

import pcompile
from pcompile.cluster import CollectiveFit
from pcompile.cost.layer_work import LayerWork
from pcompile.cost.profile import WAKEUP_BYTES, build_cluster
from pcompile.cost.tp_comm import tp_comm
from pcompile.plan import Strategy


def _cluster(wakeup=()):
    base = pcompile.Cluster.local(2)  # cpu device: 10 GB/s memory bandwidth
    fits = (CollectiveFit("all_reduce", 2, "intra", 1e-3, 1e-9), CollectiveFit("all_gather", 2, "intra", 2e-3, 2e-9),
            CollectiveFit("reduce_scatter", 2, "intra", 3e-3, 3e-9))
    return dataclasses.replace(base, collectives=fits, wakeup=wakeup)


def _work():
    return LayerWork(ops=(), saved=0.0, saved_sp=0.0, input_bytes=0.0, largest_output=0.0, param_numels=(),
                     largest_linear=0, largest_param=0, reduce_fwd=(1e6,), reduce_bwd=(2e6,), loss_fwd=(4e3,))


# wake-up after compute on 2 ranks: none after 0.3 ms (the fits' burst), 2 ms after 1 ms, 3 ms after 9 ms
WAKEUP = ((2, 0.3e-3, 0.0), (2, 1e-3, 2e-3), (2, 9e-3, 3e-3))


def test_tp_all_reduce_pays_clone_and_wakeup():
    cluster, groups = _cluster(WAKEUP), [[0, 1]]
    # forward: 2 calls after 8 ms of compute, 4 ms each: wake-up 2 + (4 - 1) / (9 - 1) ms = 2.375 ms;
    # backward: 1 call after 20 ms, past the last point: 3 ms
    fwd, bwd = tp_comm(_work(), cluster, Strategy(dp=1, tp=2), groups, 0.5, 1.0, 8e-3, 20e-3)
    # forward: row all-reduce of 0.5 MB = 1 ms + 0.5 ms fitted, clone 2 x 0.5 MB / 10 GB/s = 0.1 ms;
    # the loss vector (2 KB, in place: no clone) 1 ms + 0.002 ms
    assert math.isclose(fwd, (1.5e-3 + 0.1e-3 + 2.375e-3) + (1e-3 + 2e3 * 1e-9 + 2.375e-3))
    # backward: column-input all-reduce of 1 MB = 1 ms + 1 ms, clone 0.2 ms
    assert math.isclose(bwd, 2e-3 + 0.2e-3 + 3e-3)
    # short compute between calls: 0.1 ms each, below the first point, no wake-up
    fwd, _ = tp_comm(_work(), cluster, Strategy(dp=1, tp=2), groups, 0.5, 1.0, 0.2e-3, 0.0)
    assert math.isclose(fwd, (1.5e-3 + 0.1e-3) + (1e-3 + 2e3 * 1e-9))


def test_sp_pairs_pay_their_copies():
    cluster, groups = _cluster(), [[0, 1]]
    fwd, bwd = tp_comm(dataclasses.replace(_work(), loss_fwd=()), cluster, Strategy(dp=1, tp=2, sp=True), groups,
                        scale=1.0, act=1.0)
    # forward: reduce-scatter of 1 MB (3 + 3 ms, movedim copy 0.2 ms) + all-gather of 2 MB (2 + 4 ms, cat 0.4 ms)
    assert math.isclose(fwd, 6.2e-3 + 6.4e-3)
    # backward: all-gather of 1 MB (2 + 2 ms, 0.2 ms) + reduce-scatter of 2 MB (3 + 6 ms, 0.4 ms)
    assert math.isclose(bwd, 4.2e-3 + 9.4e-3)


def test_no_wakeup_without_a_profile_figure():
    cluster = _cluster(((4, 1e-3, 0.0), (4, 2e-3, 1.0)))  # only for groups of 4
    assert cluster.wakeup_time(2, 1.0) == 0.0 and cluster.wakeup_time(1, 1.0) == 0.0
    assert cluster.wakeup_time(4, 1.0) == 1.0 and cluster.wakeup_time(4, 1.5e-3) == 0.5


def test_build_cluster_takes_the_fit_off_the_wakeup_loop():
    # two ranks, three phases of (loop with the 1 KB all-reduce, phase alone) each:
    #   short: (1.0, 0.2) and (1.0, 0.4) ms -> medians 1.0 - 0.3 = 0.7 ms, the fits' own: the zero point
    #   1 ms : (4.0, 1.0) and (4.0, 1.2) -> 4.0 - 1.1 = 2.9 ms: 2.2 ms more
    #   9 ms : (10.0, 8.0) and (10.0, 10.0) -> 10 - 9 = 1.0 ms: below the previous, kept at 2.2
    points = [("all_reduce", 2, 1024, 0.5e-3), ("all_reduce", 2, 4096, 0.6e-3)]
    rank = dict(matmul_fp32=[(1e6, 1e9)], memory_bandwidth=1e10, op_overhead=(1e-5, 2e-5), collectives=points,
                overlap=0.5)
    ms = 1e-3
    per_rank = [dict(rank, wakeup=[(2, [(1.0 * ms, 0.2 * ms), (4 * ms, 1.0 * ms), (10 * ms, 8 * ms)])]),
                dict(rank, wakeup=[(2, [(1.0 * ms, 0.4 * ms), (4 * ms, 1.2 * ms), (10 * ms, 10 * ms)])])]
    cluster = build_cluster(per_rank, 2, "gloo", memory_bytes=2**30)
    assert WAKEUP_BYTES == 1024
    expected = ((2, 0.3e-3, 0.0), (2, 1.1e-3, 2.2e-3), (2, 9e-3, 2.2e-3))
    assert all(a[0] == b[0] and math.isclose(a[1], b[1]) and math.isclose(a[2], b[2], abs_tol=1e-12)
               for a, b in zip(cluster.wakeup, expected)) and len(cluster.wakeup) == 3
    assert pcompile.Cluster.from_json(json.dumps(cluster.to_dict())) == cluster  # the field round-trips
    # a profile written before the field loads with none
    data = cluster.to_dict()
    del data["wakeup"]
    assert pcompile.Cluster.from_dict(data).wakeup == ()


def test_linear_rate_caps_a_linear_at_its_intensity():
    from pcompile.cluster import Device
    from pcompile.cost.pricing import op_time

    # square matmuls reach 80 GFLOP/s at any size; a Linear of 10 FLOP/byte 20 GFLOP/s, of 100 FLOP/byte
    # 80 GFLOP/s; 40 FLOP/byte interpolates log-log: 20 * 4^(log 4 / log 10) GFLOP/s
    device = Device("cpu", 2**30, 80e9, 10e9, op_overhead=1e-5, matmul_curve=((1e6, 80e9), (1e9, 80e9)),
                    linear_curve=((10.0, 20e9), (100.0, 80e9)))
    flops, moved = 4e8, 1e7  # 40 FLOP/byte
    rate = 20e9 * 4 ** (math.log(4) / math.log(10))
    assert math.isclose(op_time(device, flops, moved, linear=True), 1e-5 + flops / rate)
    assert math.isclose(op_time(device, flops, moved), 1e-5 + flops / 80e9)  # not a Linear: the square curve
    # split in 2: each piece has the same intensity, one overhead each
    assert math.isclose(op_time(device, flops, moved, chunks=2, linear=True), 2e-5 + flops / rate)
    # above the curve's intensities the square curve's rate is the cap
    assert math.isclose(op_time(device, 4e9, 1e7, linear=True), 1e-5 + 4e9 / 80e9)
    # a profile without a linear curve keeps the square curve
    plain = dataclasses.replace(device, linear_curve=())
    assert math.isclose(op_time(plain, flops, moved, linear=True), 1e-5 + flops / 80e9)


def test_sp_charges_one_all_reduce_per_broadcast_parameter_the_rewrite_makes():
    """Under sequence parallelism each [hidden] parameter a token-wise op broadcasts over the
    sequence (norm weights and biases, row Linears' biases) gets a tp_copy whose backward
    all-reduces its partial gradient alone: layer_work counts exactly the rewrite's, and the
    price charges each call (under a 20 ms link, 20 ms each: the GPT's 26 are half its sp step)."""
    from pcompile.cost.layer_work import layer_work
    from pcompile.models import GPT, GPTConfig, gpt_inputs
    from pcompile.runtime import collectives

    cfg = GPTConfig(hidden=64, num_heads=4, num_layers=2, seq_len=32)
    cluster = pcompile.Cluster.local(4)
    plan = pcompile.Plan.uniform(dp=2, tp=2, sp=True)
    ir = pcompile.compile(GPT(cfg), cluster, gpt_inputs(cfg, 8), plan=plan, stop_after="layers")
    works = layer_work(ir, 2)
    rewritten = pcompile.compile(GPT(cfg), cluster, gpt_inputs(cfg, 8), plan=plan, stop_after="sequence_parallel")
    copies = [n for n in rewritten.graph.nodes if n.op == "call_function" and n.target is collectives.tp_copy
              and n.args[0].op == "get_attr"]
    assert sum(len(w.sp_param_reduces) for w in works.values()) == len(copies) == 2 * 6 + 2
    block = works["blocks.0"]
    slow = cluster.with_min_transfer(0.02)
    groups = [[0, 1], [2, 3]]
    _, with_sp = tp_comm(block, slow, Strategy(dp=2, tp=2, sp=True), groups, 0.5, 1.0)
    _, without = tp_comm(dataclasses.replace(block, sp_param_reduces=()), slow, Strategy(dp=2, tp=2, sp=True),
                          groups, 0.5, 1.0)
    assert with_sp - without >= 6 * 0.02
