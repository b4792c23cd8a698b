"""tp collectives are charged as the runtime runs them: the fitted collective, the copies
pcompile.collectives makes around it, and the profiled wake-up cost after compute."""
from __future__ import annotations

import dataclasses
import json
import math

import pcompile
from pcompile.cluster import CollectiveFit
from pcompile.cost import LayerWork, _tp_comm
from pcompile.plan import Strategy
from pcompile.profile import WAKEUP_BYTES, build_cluster


def _cluster(wakeup=()):
    base = pcompile.Cluster.local(2)  # cpu device: 10 GB/s memory bandwidth
    fits = (CollectiveFit("all_reduce", 2, "intra", 1e-3, 1e-9), CollectiveFit("all_gather", 2, "intra", 2e-3, 2e-9),
            CollectiveFit("reduce_scatter", 2, "intra", 3e-3, 3e-9))
    return dataclasses.replace(base, collectives=fits, wakeup=wakeup)


def _work():
    return LayerWork(ops=(), saved=0.0, saved_sp=0.0, input_bytes=0.0, largest_output=0.0, param_numels=(),
                     largest_linear=0, largest_param=0, reduce_fwd=(1e6,), reduce_bwd=(2e6,), loss_fwd=(4e3,))


def test_tp_all_reduce_pays_clone_and_wakeup():
    cluster, groups = _cluster(((2, 2.5e-3),)), [[0, 1]]
    fwd, bwd = _tp_comm(_work(), cluster, Strategy(dp=1, tp=2), groups, scale=0.5, act=1.0)
    # forward: row all-reduce of 0.5 MB = 1 ms + 0.5 ms fitted, clone 2 x 0.5 MB / 10 GB/s = 0.1 ms,
    # wake-up 2.5 ms; the loss vector (2 KB, in place: no clone) 1 ms + 0.002 ms + 2.5 ms
    assert math.isclose(fwd, (1.5e-3 + 0.1e-3 + 2.5e-3) + (1e-3 + 2e3 * 1e-9 + 2.5e-3))
    # backward: column-input all-reduce of 1 MB = 1 ms + 1 ms, clone 0.2 ms, wake-up 2.5 ms
    assert math.isclose(bwd, 2e-3 + 0.2e-3 + 2.5e-3)


def test_sp_pairs_pay_their_copies():
    cluster, groups = _cluster(), [[0, 1]]
    fwd, bwd = _tp_comm(dataclasses.replace(_work(), loss_fwd=()), cluster, Strategy(dp=1, tp=2, sp=True), groups,
                        scale=1.0, act=1.0)
    # forward: reduce-scatter of 1 MB (3 + 3 ms, movedim copy 0.2 ms) + all-gather of 2 MB (2 + 4 ms, cat 0.4 ms)
    assert math.isclose(fwd, 6.2e-3 + 6.4e-3)
    # backward: all-gather of 1 MB (2 + 2 ms, 0.2 ms) + reduce-scatter of 2 MB (3 + 6 ms, 0.4 ms)
    assert math.isclose(bwd, 4.2e-3 + 9.4e-3)


def test_no_wakeup_without_a_profile_figure():
    cluster = _cluster(((4, 1.0),))  # only for groups of 4
    assert cluster.wakeup_time(2) == 0.0 and cluster.wakeup_time(4) == 1.0 and cluster.wakeup_time(1) == 0.0


def test_build_cluster_takes_the_fit_off_the_wakeup_loop():
    # two ranks: the loop (phase + 1 KB all-reduce) takes 12 ms on both, the phase alone 8 and
    # 10 ms (median 9); the 1 KB all-reduce fits at 0.5 ms + 1024 x 1e-7 s: wake-up = 12 - 9 - 0.6024 ms
    points = [("all_reduce", 2, 1024, 0.5e-3 + 1024e-7), ("all_reduce", 2, 4096, 0.5e-3 + 4096e-7)]
    rank = dict(matmul_fp32=[(1e6, 1e9)], memory_bandwidth=1e10, op_overhead=(1e-5, 2e-5), collectives=points,
                overlap=0.5)
    per_rank = [dict(rank, wakeup=[(2, 12e-3, 8e-3)]), dict(rank, wakeup=[(2, 12e-3, 10e-3)])]
    cluster = build_cluster(per_rank, 2, "gloo", memory_bytes=2**30)
    assert WAKEUP_BYTES == 1024
    (size, seconds), = cluster.wakeup
    assert size == 2 and math.isclose(seconds, 12e-3 - 9e-3 - (0.5e-3 + 1024e-7), rel_tol=1e-6)
    assert pcompile.Cluster.from_json(json.dumps(cluster.to_dict())) == cluster  # the field round-trips
    # a profile written before the field loads with none
    data = cluster.to_dict()
    del data["wakeup"]
    assert pcompile.Cluster.from_dict(data).wakeup == ()
