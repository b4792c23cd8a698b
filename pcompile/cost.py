"""Cost model (first version): time and memory of one uniform (dp, tp) strategy on a cluster.

  compute  = sum over nodes of max(FLOPs_local / peak FLOP/s, bytes_local / memory bandwidth),
             FLOPs_local = (forward + backward FLOPs) / dp, and / tp on nodes split over tp
  tp comm  = one all-reduce of the activation per tp_copy (backward) and per row-parallel
             Linear (forward), on the tp group's link
  dp comm  = one all-reduce of this rank's gradients on the dp group's link (ranks tp apart)
  memory   = 4 x local parameter bytes (parameter, gradient, Adam m and v, all fp32)
             + saved activations / dp (/ tp where split)

All-reduce time is the ring's alpha-beta cost: 2 (n-1) alpha + 2 (n-1)/n * bytes / bandwidth.
"""
from __future__ import annotations

from dataclasses import dataclass

from pcompile.cluster import Cluster
from pcompile.ir import IR
from pcompile.plan import Estimate, Strategy

# Parameter + gradient + Adam's two moments, all fp32: 4 copies of the parameter bytes.
ADAM_STATE_COPIES = 4
# Forward reads inputs and writes the output; backward reads and writes about twice that.
BYTES_TOUCHED_FACTOR = 3


def ring_allreduce_time(num_bytes: float, group_size: int, bandwidth: float, latency: float) -> float:
    if group_size <= 1 or num_bytes <= 0:
        return 0.0
    steps = 2 * (group_size - 1)
    return steps * latency + steps / group_size * num_bytes / bandwidth


@dataclass(frozen=True)
class SplitInfo:
    """Which nodes tensor parallelism splits (from tp_rules.plan_tensor_parallel)."""

    split_nodes: frozenset  # node names whose work is divided by tp
    reduce_bytes: int  # activation bytes all-reduced per step over tp (forward + backward), full batch


def estimate_uniform(ir: IR, cluster: Cluster, strategy: Strategy, split: SplitInfo) -> Estimate:
    device = cluster.min_device()
    dp, tp = strategy.dp, strategy.tp
    compute = 0.0
    param_bytes = 0.0
    activation_bytes = 0.0
    for node in ir.graph.nodes:
        meta = ir.meta(node)
        divide = tp if node.name in split.split_nodes else 1
        flops = (meta.flops + meta.bwd_flops) / dp / divide
        touched = BYTES_TOUCHED_FACTOR * meta.output_bytes / dp / divide
        compute += max(flops / device.peak_flops, touched / device.memory_bandwidth)
        param_bytes += meta.param_bytes / divide
        activation_bytes += meta.saved_bytes / dp / divide
    tp_bw, tp_lat = cluster.link(tp, 1)
    dp_bw, dp_lat = cluster.link(dp, tp)
    comm = ring_allreduce_time(split.reduce_bytes / dp, tp, tp_bw, tp_lat) if tp > 1 else 0.0
    comm += ring_allreduce_time(param_bytes, dp, dp_bw, dp_lat)
    memory = int(ADAM_STATE_COPIES * param_bytes + activation_bytes)
    return Estimate(step_time=compute + comm, peak_memory=memory, compute_time=compute, comm_time=comm,
                    memory_budget=device.memory_bytes)
