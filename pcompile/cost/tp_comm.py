"""Tensor- and sequence-parallel collectives of one layer, priced as the runtime runs them
(pcompile.runtime.collectives): each fitted collective, the copies made around it, and on CPU
ranks the measured wake-up of a collective that follows compute. Part of pcompile.cost.pricing's
layer price (layer_cost)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pcompile.cluster import Cluster
from pcompile.cost.layer_work import LayerWork
from pcompile.plan import Strategy

if TYPE_CHECKING:
    from pcompile.cost.pricing import StageLayout


def tp_comm(work: LayerWork, cluster: Cluster, s: Strategy, groups, scale: float,
             act: float, fwd_compute: float = 0.0, bwd_compute: float = 0.0,
             layout: StageLayout | None = None) -> tuple[float, float]:
    """(forward, backward) tp collectives of one micro-batch: Megatron's all-reduces, or with
    sequence parallelism an all-gather + reduce-scatter pair in their place (same volume).
    Activations move in the activation dtype (x act); the cross-entropy's vectors in fp32.
    Each call also pays the runtime's copies around it (`tp_copy_time`) and, as it follows
    compute, the cluster's measured wake-up cost for the group size after the layer's compute
    of that direction shared evenly among its calls (`Cluster.wakeup_time`). `layout`: the
    stage's StageLayout, whose tp groups are `groups` (its memo and slowest device are used)."""
    if layout is not None:
        device = layout.slowest_memory
    else:
        device = min((cluster.device_of(r) for g in groups for r in g), key=lambda d: d.memory_bandwidth)
    n_fwd = len(work.loss_fwd) + len(work.reduce_fwd) + (len(work.reduce_bwd) if s.sp else 0)
    n_bwd = len(work.reduce_bwd) + (len(work.reduce_fwd) + len(work.sp_param_reduces) if s.sp else 0) \
        + len(work.gather_bwd)
    wake = {"fwd": cluster.wakeup_time(s.tp, fwd_compute / max(n_fwd, 1)),
            "bwd": cluster.wakeup_time(s.tp, bwd_compute / max(n_bwd, 1))}

    def t(op, nbytes, dtype_scale=act, copies=True, direction="fwd"):
        moved = nbytes * scale * dtype_scale
        copy = tp_copy_time(moved, device) if copies else 0.0
        time = (layout.collective_time(cluster, op, moved, "tp") if layout is not None
                else cluster.collective_time(op, moved, groups))
        return time + copy + (wake[direction] if moved > 0 else 0.0)

    # the parallel cross-entropy all-reduces its vectors in place (vocab_parallel._all_reduce)
    fwd = sum(t("all_reduce", nbytes, 1.0, copies=False) for nbytes in work.loss_fwd)
    bwd = 0.0
    for nbytes in work.reduce_fwd:
        fwd += t("reduce_scatter", nbytes) if s.sp else t("all_reduce", nbytes)
        bwd += t("all_gather", nbytes, direction="bwd") if s.sp else 0.0
    for nbytes in work.reduce_bwd:
        fwd += t("all_gather", nbytes) if s.sp else 0.0
        bwd += t("reduce_scatter", nbytes, direction="bwd") if s.sp else t("all_reduce", nbytes, direction="bwd")
    bwd += sum(t("all_gather", nbytes, direction="bwd") for nbytes in work.gather_bwd)
    if s.sp:  # each broadcast parameter's partial gradient, all-reduced alone (a gradient: no batch scale)
        bwd += sum(t("all_reduce", nbytes / scale, 1.0, direction="bwd") for nbytes in work.sp_param_reduces)
    return fwd, bwd


def tp_copy_time(nbytes: float, device) -> float:
    """Seconds of the copies pcompile.runtime.collectives makes around each tp collective besides the
    collective itself (the profile times the bare call): `_all_reduce` clones its input
    (x.contiguous().clone(), read + write of `nbytes`), `_all_gather` concatenates the gathered
    parts (torch.cat, read + write of the `nbytes` output), `_reduce_scatter` moves the scattered
    dim to the front (movedim().contiguous() of the `nbytes` input). Each is 2 * nbytes at the
    device's memory bandwidth (0.23 ms for a 1 MB all-reduce at the 9.2 GB/s profiled on 4 gloo
    ranks)."""
    if nbytes <= 0:
        return 0.0
    return 2 * nbytes / device.memory_bandwidth
