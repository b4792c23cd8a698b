"""The quick profile on 2 gloo ranks writes a JSON that Cluster.from_profile loads."""
from __future__ import annotations

import pcompile
from pcompile.cost.profile import fit_alpha_beta, profile_cluster


def test_fit_alpha_beta_recovers_a_line():
    points = [(n, 2e-4 + n * 3e-9) for n in (1e3, 1e4, 1e5, 1e6)]
    latency, spb = fit_alpha_beta(points)
    assert abs(latency - 2e-4) < 1e-9 and abs(spb - 3e-9) < 1e-15


def test_fit_alpha_beta_ignores_points_timed_at_zero():
    # a loaded machine can time a collective at 0 (clamped): such points must not break the fit
    points = [(1.0, 0.0), (1e3, 1e-6 + 1e3 * 1e-9), (1e6, 1e-6 + 1e6 * 1e-9)]
    latency, spb = fit_alpha_beta(points)
    assert abs(latency - 1e-6) < 1e-9 and abs(spb - 1e-9) < 1e-12
    assert fit_alpha_beta([(1.0, 0.0)]) == (0.0, 0.0)


def test_quick_profile_round_trips(tmp_path):
    path = tmp_path / "cluster.json"
    cluster = profile_cluster(2, path, quick=True)
    assert pcompile.Cluster.from_profile(path) == cluster
    device = cluster.device_of(0)
    assert device.peak_flops > 0 and device.memory_bandwidth > 0 and len(device.matmul_curve) == 3
    ops = {(f.op, f.group_size) for f in cluster.collectives}
    assert {("all_reduce", 2), ("all_gather", 2), ("reduce_scatter", 2), ("send", 2)} <= ops
    assert all(f.latency >= 0 and f.seconds_per_byte >= 0 for f in cluster.collectives)
    assert 0.0 <= cluster.overlap <= 1.0
    assert device.gelu_rate > 0 and device.gelu_backward_rate > 0


def test_collective_points_are_median_loop_less_median_burst():
    from pcompile.cost.profile import build_cluster

    ms = 1e-3
    # two ranks; per point (.., rank's difference, loop, burst): loops 3 and 4 ms on both ranks (in
    # step), bursts 1 and 2 ms (median 1.5): 1.5 ms at 1000 bytes, 2.5 ms at 2000 -> 0.5 ms + 1 us/byte
    def rank(burst):
        return dict(matmul_fp32=[(1e6, 1e9)], memory_bandwidth=1e10, op_overhead=(1e-5, 2e-5), overlap=0.5,
                    collectives=[("all_reduce", 2, 1000, 3 * ms - burst, 3 * ms, burst),
                                 ("all_reduce", 2, 2000, 4 * ms - burst, 4 * ms, burst)])
    cluster = build_cluster([rank(1 * ms), rank(2 * ms)], 2, "gloo", memory_bytes=2**30)
    fit, = [f for f in cluster.collectives if f.op == "all_reduce"]
    assert abs(fit.latency - 0.5 * ms) < 1e-9 and abs(fit.seconds_per_byte - 1e-6) < 1e-12
    # an older profile's 4-tuples: the slowest rank's figure
    old = [dict(rank(0), collectives=[("all_reduce", 2, 1000, t), ("all_reduce", 2, 2000, t + ms)])
           for t in (1 * ms, 1.5 * ms)]
    fit, = [f for f in build_cluster(old, 2, "gloo", memory_bytes=2**30).collectives if f.op == "all_reduce"]
    assert abs(fit.latency - 0.5 * ms) < 1e-9 and abs(fit.seconds_per_byte - 1e-6) < 1e-12
