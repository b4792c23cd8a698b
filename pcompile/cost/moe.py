"""The price of a mixture-of-experts layer's experts under expert parallelism (issue #18 item 3),
as the runtime runs them (pcompile.runtime.expert_parallel, passes/expert_parallel.py,
backends/expert_groups.py). The search's tables (pcompile.cost.stage_costs) price a layer with
ep > 1 as its work without the dense mixture (`mixture_nodes`, what the rewrite erases) plus
`expert_cost` (`ep_layer_cost`); `pcompile.estimate` and a plan's printed estimate read the
same tables.

Per rank and step, for one MoE layer of E experts, top-k routing, T tokens (of the micro-batch
in the tables, of the example batch by default), hidden size H:

  compute  each held expert's two Linears and activation (pricing.op_time: the device's matmul
           and linear curves at the plan's precision, one launch per op and expert, backward
           twice the forward) on its rows: T/dp x k x imbalance x ep / E rows per held expert
           under ep (dropless dispatch; imbalance: the busiest rank's load over the mean, 1 =
           uniform routing, CostOptions.expert_imbalance), E/ep held. Without ep the built-in
           MoE's dense form runs all E experts on all T/dp tokens, HF's grouped-mm experts T/dp
           x k / E rows each (dropless already), plus the combine (k rows per token read back)
  all-to-all  per micro-batch: forward the rows out and back plus one of the E counts, backward
           the rows' gradients out and back, each rank's T/dp x k rows of H values in the
           activation dtype: alpha-beta on the ep group's link ((n-1) alpha + (n-1)/n B / bw,
           Cluster.collective_time's ring), or a measured "all_to_all" fit (pcompile profile);
           at least Cluster.min_transfer. An ep group is ep ranks of a dp group, tp apart
  memory   the E/ep held experts' parameters, gradients and optimizer states (the plan's bytes
           per element); activations: the dense mixture's saved bytes x k / E (each token
           reaches k of the E experts the dense form ran; HF's grouped-mm form is dropless
           already: x 1) x imbalance
  sync     after backward, not overlapped (ExpertStorage.finish): each held expert tensor
           all-reduced over the dp/ep ranks holding it (none when ep == dp), then divided by
           dp in place (a read and a write)

`ep_degrees(num_experts, dp)` is what a search may offer: the ep > 1 that divide both the
experts and the data-parallel degree; `ep_layers(ir)` the layers whose mixture the rewrite can
run under ep.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch.fx as fx

from pcompile.cluster import Cluster
from pcompile.cost.layer_work import LayerWork
from pcompile.cost.pricing import CostOptions, LayerCost, LayerMemory, StageLayout, layer_cost, op_time
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.plan import Strategy
from pcompile.sharding.moe import MoELayer, find_moe_layers

ADAM_FP32 = (4.0, 4.0, 8.0)  # (parameter, gradient, optimizer) bytes per element: fp32 AdamW


@dataclass(frozen=True)
class MoEShape:
    """What the price reads of one MoE layer."""

    layer: str
    num_experts: int
    top_k: int
    tokens: int  # tokens of the example batch the layer routes
    hidden: int  # values per token row sent
    expert_params: int  # parameters of one expert
    flops_per_token: float  # forward FLOPs of one expert on one token
    dense: bool = True  # without ep every expert runs on every token (the built-in MoE's form);
    # False: the model's own dispatch is dropless already (HF's grouped-mm experts)
    weights: tuple[tuple[int, int], ...] = ()  # one expert's Linear weights, (out, in) each, in order
    tensors: tuple[int, ...] = ()  # elements of each of one expert's parameter tensors (the sync's)
    activation: str = "gelu"  # the experts' activation (a GELU is charged at the device's GELU rate)
    saved: float = 0.0  # activation bytes the dense mixture saves for backward, example batch (fp32)


@dataclass(frozen=True)
class ExpertCost:
    """Seconds and bytes per rank of one MoE layer's experts: per micro-batch (compute,
    all-to-all, activations) and per step (sync, states)."""

    fwd: float  # forward compute seconds
    bwd: float
    a2a_fwd: float  # forward all-to-alls (0 without ep)
    a2a_bwd: float
    held_experts: int
    param_bytes: float  # the held experts' parameters
    grad_bytes: float
    optimizer_bytes: float
    saved: float  # activation bytes kept for backward
    sync: float  # seconds of the step's expert gradient sync
    sync_bytes: float  # expert gradient bytes all-reduced per step
    sync_ranks: int  # over this many ranks (those holding the same experts: dp / ep)
    largest_tensor: int  # elements of the largest expert tensor a rank holds (the optimizer step's temporaries)

    @property
    def compute(self) -> float:
        return self.fwd + self.bwd

    @property
    def all_to_all(self) -> float:
        return self.a2a_fwd + self.a2a_bwd

    @property
    def time(self) -> float:
        return self.compute + self.all_to_all

    @property
    def state_bytes(self) -> float:
        """Gradients and optimizer states of the held experts."""
        return self.grad_bytes + self.optimizer_bytes

    @property
    def memory(self) -> float:
        return self.param_bytes + self.state_bytes


def runnable(moe: MoELayer) -> bool:
    """Whether passes/expert_parallel.py runs this layer's mixture under ep (its _check, less
    what depends on the strategy): HF's batched experts only read as its grouped-mm experts,
    the gated top-k sum, experts of two Linears each with (or all without) biases."""
    if moe.layer is None or moe.output is None or moe.indices is None or moe.gates is None:
        return False
    if moe.form == "stacked":
        return moe.gated is not None
    return moe.combine is not None and len({len(e.params) for e in moe.experts}) == 1 \
        and len(moe.experts[0].params) in (2, 4)


def mixture_nodes(ir: IR, moe: MoELayer) -> list[fx.Node]:
    """The dense mixture's nodes the ep rewrite erases (passes/expert_parallel._rewrite): walked
    back from the output to the tokens, indices and gates, then those whose every user is
    erased too (the router and its probabilities stay: the top-k and any aux loss read them)."""
    stop = {moe.tokens, moe.indices, moe.gates} | ({moe.gated[3]} if moe.gated else set())
    inside, todo = set(), [moe.output]
    while todo:
        node = todo.pop()
        if node in stop or node in inside or node.op in ("placeholder", "output"):
            continue
        inside.add(node)
        todo.extend(node.all_input_nodes)
    erased = {moe.output}
    for node in reversed(ir.graph.nodes):
        if node in inside and node not in erased and node.users and all(u in erased for u in node.users):
            erased.add(node)
    return [node for node in ir.graph.nodes if node in erased]


def _shape(ir: IR, moe: MoELayer) -> MoEShape:
    shape = ir.meta(moe.tokens).shape
    tokens = math.prod(shape[:-1])
    if moe.form == "modules":
        expert = moe.experts[0]
        tensors = [ir.gm.get_parameter(name) for name in expert.params]
        weights = tuple(tuple(t.shape) for name, t in zip(expert.params, tensors) if name.endswith("weight"))
        activation = expert.activation
    else:  # batched: one expert's slice of each stacked weight
        gate_up, down, activation, _ = moe.gated
        tensors = [ir.gm.get_parameter(name)[0] for name in (gate_up, down)]
        weights = tuple(tuple(t.shape) for t in tensors)
    numels = tuple(t.numel() for t in tensors)
    saved = float(sum(ir.meta(n).saved_bytes or 0 for n in mixture_nodes(ir, moe) if ir.has_meta(n)))
    flops = float(sum(2 * math.prod(w) for w in weights))  # a multiply-add per weight per token
    return MoEShape(moe.layer, moe.num_experts, moe.top_k, tokens, shape[-1], sum(numels), flops,
                    dense=moe.form == "modules", weights=weights, tensors=numels, activation=str(activation),
                    saved=saved)


def moe_shapes(ir: IR) -> list[MoEShape]:
    """The MoE layers of an analysed IR (shapes pass run) that ep can run, with the numbers the
    price needs, in graph order."""
    return [_shape(ir, moe) for moe in find_moe_layers(ir) if runnable(moe)]


def ep_layers(ir: IR) -> dict[str, tuple[MoEShape, frozenset]]:
    """{layer: (its MoEShape, the dense mixture's nodes)} of the layers ep can run (one MoE
    layer per IR layer; a layer holding two mixtures is left out: the price is per mixture)."""
    found: dict[str, list] = {}
    for moe in find_moe_layers(ir):
        if runnable(moe):
            found.setdefault(moe.layer, []).append(moe)
    return {layer: (_shape(ir, moes[0]), frozenset(mixture_nodes(ir, moes[0])))
            for layer, moes in found.items() if len(moes) == 1}


def ep_degrees(num_experts: int, dp: int) -> list[int]:
    """The ep > 1 a search may offer: dividing the experts and the data-parallel degree."""
    return [ep for ep in range(2, dp + 1) if dp % ep == 0 and num_experts % ep == 0]


def all_to_all_time(cluster: Cluster, nbytes: float, ranks) -> float:
    """Seconds of one all-to-all in which each rank of `ranks` holds `nbytes` to spread over the
    group: a measured "all_to_all" fit of the cluster for (group size, link), else alpha-beta
    on the group's link: (n-1) alpha + (n-1)/n bytes / bandwidth; at least the cluster's
    min_transfer."""
    ranks = list(ranks)
    size = len(ranks)
    if size <= 1 or nbytes <= 0:
        return 0.0
    kind = cluster.link_kind(ranks)
    fit = next((f for f in cluster.collectives if (f.op, f.group_size, f.link) == ("all_to_all", size, kind)), None)
    if fit is not None:
        return max(fit.latency + nbytes * fit.seconds_per_byte, cluster.min_transfer)
    bandwidth, latency = cluster.link_of(ranks)
    return max((size - 1) * latency + (size - 1) / size * nbytes / bandwidth, cluster.min_transfer)


def expert_groups(first_rank: int, dp: int, tp: int, ep: int) -> tuple[list[int], list[list[int]]]:
    """(the first ep group, every group of ranks holding the same experts) of a stage from
    `first_rank`, as backends/expert_groups.py lays them out: rank = first + d tp + t for dp
    coordinate d and tp coordinate t; an ep group is dp coordinates a ep .. (a+1) ep - 1 at one t,
    the holders of one ep coordinate o the dp coordinates o, o + ep, ..."""
    ep_group = [first_rank + d * tp for d in range(ep)]
    holders = [[first_rank + d * tp + t for d in range(o, dp, ep)] for o in range(ep) for t in range(tp)]
    return ep_group, holders


def expert_cost(shape: MoEShape, cluster: Cluster, dp: int, ep: int, *, tp: int = 1, first_rank: int = 0,
                tokens: float | None = None, state_bytes: tuple[float, float, float] = ADAM_FP32,
                mixed_precision: bool = False, imbalance: float = 1.0, devices=None) -> ExpertCost:
    """Per rank, the experts of `shape` under dp-way data parallelism with ep-way expert
    parallelism, tp-way tensor parallelism outside them (the experts are whole on every tp
    rank), on the stage starting at `first_rank`; `tokens` of the micro-batch (default the
    shape's example batch); `state_bytes` (parameter, gradient, optimizer) bytes per element;
    `devices`: the stage's devices when the caller has them (found from the ranks otherwise)."""
    if ep < 1 or dp % ep or shape.num_experts % ep:
        raise PcompileError(f"ep={ep} must divide dp={dp} and the {shape.num_experts} experts of {shape.layer}",
                            f"choose ep among {ep_degrees(shape.num_experts, dp) or [1]}")
    if imbalance < 1.0:
        raise PcompileError(f"imbalance={imbalance} is below 1 (the busiest rank's load over the mean)",
                            "pass 1.0 for uniform routing or the measured max / mean expert load")
    act = 0.5 if mixed_precision else 1.0
    value = 4.0 * act  # bytes of one activation value
    local = (shape.tokens if tokens is None else tokens) / dp
    held = shape.num_experts // ep
    if ep > 1:
        rows = local * shape.top_k * imbalance * ep / shape.num_experts
    else:
        rows = local if shape.dense else local * shape.top_k / shape.num_experts
    weights = shape.weights or ((shape.hidden, int(shape.flops_per_token / 2 / max(shape.hidden, 1))),)
    if devices is None:
        devices = {cluster.device_of(r) for r in range(first_rank, first_rank + dp * tp)}
    fwd = bwd = 0.0
    for device in devices:  # every rank waits for the slowest
        device = device.at_precision(mixed_precision)
        f = b = 0.0
        for out, inp in weights:
            flops, moved = 2.0 * rows * out * inp, rows * (out + inp) * value + out * inp * state_bytes[0]
            f += op_time(device, flops, moved, linear=True)
            b += op_time(device, 2 * flops, 2 * moved, 2 if flops > 0 else 1, device.backward_overhead, linear=True)
        inner = rows * weights[0][0] / (1 if shape.dense else 2)  # the activation's elements (HF: act(gate) * up)
        f += op_time(device, 0.0, 2 * inner * value, elements=inner if shape.activation == "gelu" else 0.0,
                     element_rate=device.gelu_rate)
        b += op_time(device, 0.0, 4 * inner * value, overhead=device.backward_overhead,
                     elements=inner if shape.activation == "gelu" else 0.0, element_rate=device.gelu_backward_rate)
        combine = local * (shape.num_experts if shape.dense and ep == 1 else shape.top_k) * shape.hidden * value
        fwd, bwd = max(fwd, held * f + op_time(device, 0.0, 2 * combine)), \
            max(bwd, held * b + op_time(device, 0.0, 4 * combine, overhead=device.backward_overhead))
    group, holders = expert_groups(first_rank, dp, tp, ep)
    a2a_fwd = a2a_bwd = 0.0
    if ep > 1:
        row_bytes = local * shape.top_k * shape.hidden * value
        a2a_fwd = 2 * all_to_all_time(cluster, row_bytes, group) + all_to_all_time(cluster, 8.0 * shape.num_experts,
                                                                                   group)
        a2a_bwd = 2 * all_to_all_time(cluster, row_bytes, group)
    p_bytes, g_bytes, o_bytes = state_bytes
    elements = float(held * shape.expert_params)
    tensors = shape.tensors or (shape.expert_params,)
    # the modules form holds each expert's tensors; the batched form one chunk of E/ep experts per weight
    held_tensors = [n for n in tensors for _ in range(held)] if shape.dense else [n * held for n in tensors]
    sync_ranks = dp // ep
    sync = 0.0
    if sync_ranks > 1:
        sync = sum(cluster.collective_time("all_reduce", n * g_bytes, holders) for n in held_tensors)
    if ep > 1 and dp > 1:  # ExpertStorage.finish divides every held gradient by dp in place
        slowest = min(d.memory_bandwidth for d in devices)
        sync += 2 * elements * g_bytes / slowest
    share = (shape.top_k / shape.num_experts if shape.dense else 1.0) * (imbalance if ep > 1 else 1.0)
    saved = shape.saved * share * local / max(shape.tokens, 1) * act if ep > 1 else shape.saved * local / max(
        shape.tokens, 1) * act
    return ExpertCost(fwd=fwd, bwd=bwd, a2a_fwd=a2a_fwd, a2a_bwd=a2a_bwd, held_experts=held,
                      param_bytes=elements * p_bytes, grad_bytes=elements * g_bytes, optimizer_bytes=elements * o_bytes,
                      saved=saved, sync=sync, sync_bytes=elements * g_bytes if sync_ranks > 1 else 0.0,
                      sync_ranks=sync_ranks, largest_tensor=max(held_tensors))


def ep_layer_cost(work: LayerWork, shape: MoEShape, cluster: Cluster, s: Strategy, microbatch: int, batch: int,
                  options: CostOptions, layout: StageLayout | None = None, compute=None) -> LayerCost:
    """A MoE layer's price under strategy `s` with ep > 1: `work` (the layer's work without its
    dense mixture: layer_work(..., skip=mixture_nodes)) priced as pricing.layer_cost prices it,
    plus `expert_cost` at the micro-batch's tokens: its compute and all-to-alls in forward and
    backward (again in backward when checkpointed: the region recomputes the dispatch), the
    held experts' states, their activations (kept unless checkpointed, then transient), their
    sync after backward and their optimizer step's temporaries."""
    where = f"expert parallelism (ep={s.ep}) in layer {shape.layer!r}"
    for name, on, fix in (("ZeRO-3", s.sdp, "sdp=false"), ("ZeRO-2", s.zero2, "zero2=false"),
                          ("operator split", s.split > 1, "split=1")):
        if on:
            raise PcompileError(f"{where} with {name} is not supported", f"use {fix} with ep, or ep=1")
    kwargs = {} if compute is None else {"compute": compute}
    base = layer_cost(work, cluster, s, microbatch, batch, options, layout, **kwargs)
    e = expert_cost(shape, cluster, s.dp, s.ep, tp=s.tp, first_rank=options.first_rank,
                    tokens=shape.tokens * microbatch / batch, state_bytes=options.state_bytes(),
                    mixed_precision=options.mixed_precision, imbalance=options.expert_imbalance,
                    devices=layout.devices if layout is not None else None)
    fwd = e.fwd + e.a2a_fwd
    recompute = fwd if s.checkpoint else 0.0
    m = base.memory
    if options.foreach(cluster):  # one fp32 copy of every parameter at once
        step_temp = m.step_temp + 4.0 * e.held_experts * shape.expert_params
    else:  # two temporaries of the largest tensor
        step_temp = max(m.step_temp, 2 * 4.0 * e.largest_tensor)
    memory = LayerMemory(params=m.params + e.param_bytes, grads=m.grads + e.grad_bytes,
                         optimizer=m.optimizer + e.optimizer_bytes,
                         activations=m.activations + (0.0 if s.checkpoint else e.saved),
                         temp=m.temp + (e.saved if s.checkpoint else 0.0), step_temp=step_temp)
    return LayerCost(base.fwd + fwd, base.bwd + e.bwd + e.a2a_bwd + recompute, base.sync + e.sync,
                     base.comm + e.all_to_all + (e.a2a_fwd if s.checkpoint else 0.0), memory)


def plain(s: Strategy) -> Strategy:
    """`s` without ep: what a layer without a mixture of experts runs under it."""
    return dataclasses.replace(s, ep=1) if s.ep > 1 else s
