"""The price of a mixture-of-experts layer's experts under expert parallelism (issue #18 item 3),
as the runtime runs them (pcompile.runtime.expert_parallel, passes/expert_parallel.py).

Per rank and step, for one MoE layer of E experts, top-k routing, T tokens of the global
batch, hidden size H and expert FLOPs f per routed token (2 x the expert's multiply-adds):

  compute  ep = 1: the built-in MoE's dense form (every expert on every token, gated),
           T/dp x E x f; HF's grouped-mm experts T/dp x k x f (dropless already)
           ep > 1: the dropless dispatch, T/dp x k x f x imbalance (the busiest rank of the
           group waits for its most loaded experts; 1 = uniform routing)
           backward twice the forward
  all-to-all  four per step (rows out and back, forward and backward) of the rank's T/dp x k
           rows of H values each, plus one of the E counts: alpha-beta on the ep group's link,
           (n-1) alpha + (n-1)/n B / bw (the ring model of Cluster.collective_time), or a
           measured "all_to_all" fit of the cluster (pcompile profile) when it has one
  memory   the experts' parameters, gradients and AdamW moments of the E/ep experts a rank
           holds (backends/expert_groups.py); their gradients are all-reduced over the dp/ep
           ranks holding the same experts (`sync_bytes` over `sync_ranks`), not over dp

`ep_degrees(num_experts, dp)` is what a search may offer: the ep > 1 that divide both the
experts and the data-parallel degree. Nothing here is wired into the search yet.
"""
from __future__ import annotations

from dataclasses import dataclass

from pcompile.cluster import Cluster
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.sharding.moe import find_moe_layers


@dataclass(frozen=True)
class MoEShape:
    """What the price reads of one MoE layer of the modules form."""

    layer: str
    num_experts: int
    top_k: int
    tokens: int  # tokens of the global batch the layer routes
    hidden: int  # values per token row sent
    expert_params: int  # parameters of one expert
    flops_per_token: float  # forward FLOPs of one expert on one token
    dense: bool = True  # without ep every expert runs on every token (the built-in MoE's form);
    # False: the model's own dispatch is dropless already (HF's grouped-mm experts)


@dataclass(frozen=True)
class ExpertCost:
    """Seconds and bytes per rank and step of one MoE layer's experts."""

    compute: float  # forward + backward seconds
    all_to_all: float  # seconds of the step's all-to-alls (0 without ep)
    held_experts: int
    param_bytes: float  # the held experts' parameters
    state_bytes: float  # their gradients and optimizer moments
    sync_bytes: float  # expert gradient bytes all-reduced per step
    sync_ranks: int  # over this many ranks (those holding the same experts: dp / ep)

    @property
    def time(self) -> float:
        return self.compute + self.all_to_all

    @property
    def memory(self) -> float:
        return self.param_bytes + self.state_bytes


def moe_shapes(ir: IR) -> list[MoEShape]:
    """The MoE layers of an analysed IR (shapes pass run) with the numbers the price needs."""
    out = []
    for moe in find_moe_layers(ir):
        if moe.form == "stacked" and moe.gated is None:
            continue
        shape = ir.meta(moe.tokens).shape
        tokens = 1
        for size in shape[:-1]:
            tokens *= size
        if moe.form == "modules":
            expert = moe.experts[0]
            params = sum(ir.gm.get_parameter(name).numel() for name in expert.params)
            weights = [ir.gm.get_parameter(name).numel() for name in expert.params if name.endswith("weight")]
        else:  # batched: one expert's slice of each stacked weight
            weights = [ir.gm.get_parameter(name)[0].numel() for name in moe.gated[:2]]
            params = sum(weights)
        flops = float(sum(2 * w for w in weights))  # a multiply-add per weight per token
        out.append(MoEShape(moe.layer, moe.num_experts, moe.top_k, tokens, shape[-1], params, flops,
                            dense=moe.form == "modules"))
    return out


def ep_degrees(num_experts: int, dp: int) -> list[int]:
    """The ep > 1 a search may offer: dividing the experts and the data-parallel degree."""
    return [ep for ep in range(2, dp + 1) if dp % ep == 0 and num_experts % ep == 0]


def all_to_all_time(cluster: Cluster, nbytes: float, ranks) -> float:
    """Seconds of one all-to-all in which each rank of `ranks` holds `nbytes` to spread over the
    group: a measured "all_to_all" fit of the cluster for (group size, link), else alpha-beta
    on the group's link: (n-1) alpha + (n-1)/n bytes / bandwidth."""
    ranks = list(ranks)
    size = len(ranks)
    if size <= 1 or nbytes <= 0:
        return 0.0
    kind = cluster.link_kind(ranks)
    fit = next((f for f in cluster.collectives if (f.op, f.group_size, f.link) == ("all_to_all", size, kind)), None)
    if fit is not None:
        return fit.latency + nbytes * fit.seconds_per_byte
    bandwidth, latency = cluster.link_of(ranks)
    return (size - 1) * latency + (size - 1) / size * nbytes / bandwidth


def expert_cost(shape: MoEShape, cluster: Cluster, dp: int, ep: int, *, first_rank: int = 0,
                dtype_bytes: int = 4, optimizer_states: int = 2, imbalance: float = 1.0) -> ExpertCost:
    """Per rank and step, the experts of `shape` under dp-way data parallelism with ep-way expert
    parallelism (ep groups: ep consecutive ranks of the dp group from `first_rank`)."""
    if ep < 1 or dp % ep or shape.num_experts % ep:
        raise PcompileError(f"ep={ep} must divide dp={dp} and the {shape.num_experts} experts of {shape.layer}",
                            f"choose ep among {ep_degrees(shape.num_experts, dp) or [1]}")
    if imbalance < 1.0:
        raise PcompileError(f"imbalance={imbalance} is below 1 (the busiest rank's load over the mean)",
                            "pass 1.0 for uniform routing or the measured max / mean expert load")
    device = cluster.device_of(first_rank)
    local_tokens = shape.tokens / dp
    rows = local_tokens * (shape.top_k * imbalance if ep > 1 else shape.num_experts if shape.dense else shape.top_k)
    forward = rows * shape.flops_per_token / device.peak_flops
    a2a = 0.0
    if ep > 1:
        group = range(first_rank, first_rank + ep)
        row_bytes = local_tokens * shape.top_k * shape.hidden * dtype_bytes
        a2a = 4 * all_to_all_time(cluster, row_bytes, group) + all_to_all_time(cluster, 8.0 * shape.num_experts, group)
    held = shape.num_experts // ep
    params = float(held * shape.expert_params * dtype_bytes)
    return ExpertCost(compute=3 * forward, all_to_all=a2a, held_experts=held, param_bytes=params,
                      state_bytes=params * (1 + optimizer_states), sync_bytes=params if dp > ep else 0.0,
                      sync_ranks=dp // ep)
