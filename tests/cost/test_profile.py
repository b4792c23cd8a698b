"""The quick profile on 2 gloo ranks writes a JSON that Cluster.from_profile loads."""
from __future__ import annotations

import pcompile
from pcompile.profile import fit_alpha_beta, profile_cluster


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
