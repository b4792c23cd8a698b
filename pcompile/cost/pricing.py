"""Cost model: time and memory of every layer under every strategy, derived from the annotated IR.

Everything below is per device of one pipeline stage, for one micro-batch of `microbatch_size`
samples (global to the stage: a layer with dp ranks runs microbatch_size / dp of them). The IR's
figures are for the example batch; every activation, FLOP and byte count is linear in the batch
(one sample's work does not depend on the others), so they are scaled by samples / example batch.

time of one op  = k * (overhead + max(FLOPs / (k * rate(FLOPs / k)), bytes / bandwidth))
                  rate() is the device's measured matmul curve (peak FLOP/s without one), k the
                  operator split of Linears (1 elsewhere); backward = 2x forward's FLOPs and bytes;
                  a GELU takes at least its elements / the device's measured GELU rate (forward,
                  backward: Device.gelu_rate, gelu_backward_rate; none = the roofline alone)
checkpointing   : backward += forward (recompute, tp collectives included); keeps the layer input only
tp (Megatron)   : forward all-reduce after each row Linear, backward all-reduce at each column
                  Linear's input; sp turns each into all-gather + reduce-scatter and divides the
                  layernorm / residual regions (and their activations) by tp as well. Vocab
                  parallelism: an embedding split along the vocabulary holds V/tp rows (a table
                  tied to the LM head is one parameter, charged once) and all-reduces its
                  [b, s, H] output in forward; the parallel cross-entropy all-reduces three fp32
                  [N] vectors (max, sum of exp, target logit) in forward, none in backward
dp              : per step, all-reduce of the layer's gradients over the dp group (ranks tp apart),
                  exposed part c - eta * min(c, backward) as the runtime overlaps it with
                  backward (eta = the cluster's calibrated overlap efficiency, or
                  CostOptions.overlap); bucketed, plus the runtime's in-place divide by dp. A whole
                  stage (estimate_uniform): its buckets issued as backward makes them ready
                  (`_stage_sync`); the last is exposed whatever eta
zero2 (ZeRO-2)  : params whole (replicated), grads / dp, optimizer states / dp plus the fp32 chunk
                  the optimizer steps (pcompile.runtime.zero2; under mixed precision the fp32
                  masters stay whole: 4 bytes per element, not / dp); per step a reduce-scatter of
                  the gradients in buckets, exposed as the dp branch's all-reduce (c - eta min(c,
                  backward)), and an all-gather of the stepped chunks into the parameters before
                  the next forward, not overlapped, both in fp32 and charged in sync with the
                  runtime's copies (gradients into the reduce-scatter's rows, the gathered values
                  into the parameters); transient: the bucket backward fills and two in flight
sdp (ZeRO-3)    : params, grads and optimizer states / dp; per micro-batch and gathered unit (the
                  layer; with split k every op reading weights, a Linear k units: `sdp_units`)
                  an all-gather in forward, a re-gather in backward where an op saved a weight,
                  and a reduce-scatter of the gradients (what FSDP does with gradient
                  accumulation), each exposed as c - eta min(c, compute) (the runtime prefetches
                  one unit ahead, FSDP2's schedule); transient: the runtime's (pcompile.runtime.sdp)
                  backward peak U + G + (U + G)(1 + 1/dp) for a unit of U gathered bytes and G
                  gradient bytes (the layer; one 1/k slice of the largest Linear when split k)
ep (experts)    : a MoE layer with ep > 1 is its work without the dense mixture priced here, plus
                  the experts as pcompile.cost.moe prices them (ep_layer_cost: dispatched compute,
                  all-to-alls, E/ep experts held, their sync over dp/ep ranks); a layer without a
                  mixture of experts runs as ep = 1 (pcompile.cost.stage_costs chooses)
tp / sp         : not overlapped (Megatron overlaps them only with its userbuffer GEMMs): charged whole
collectives     : alpha-beta; a measured fit for (op, group size, link) when the cluster has one,
                  else the ring: all-reduce 2(n-1) alpha + 2(n-1)/n B / bw, all-gather and
                  reduce-scatter (n-1) alpha + (n-1)/n B / bw, on the intra-node link when every
                  rank of the group is in one node, else the inter-node link
memory          : params, grads and optimizer states (bytes per element from CostOptions), saved
                  activations per in-flight micro-batch, and a transient: the largest op's output
                  and gradient, the sdp gathered weights, the recomputed activations when checkpointed
                  (dp sync's buckets are the gradients themselves: no transient)
Ranks as pcompile.mesh lays them out (tp innermost, then dp, pp outermost); a stage starting at
`CostOptions.first_rank` is charged on its own devices (the slowest one's time) and links.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from pcompile.cluster import Cluster
from pcompile.cost.layer_work import LayerWork, boundary_bytes, example_batch, layer_work
from pcompile.cost.offload import offload_time
from pcompile.cost.tp_comm import tp_comm
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.mesh import regroup_groups, stage_groups
from pcompile.plan import Estimate, Strategy
from pcompile.runtime.buckets import GRAD_BUCKET_BYTES, bucket_ranges
from pcompile.runtime.zero2 import IN_FLIGHT as ZERO2_IN_FLIGHT
from pcompile.search.costtable import CostTable
from pcompile.search.schedules import backward_peak

MOMENTS = {"adam": 2, "momentum": 1, "sgd": 0}




@dataclass(frozen=True)
class CostOptions:
    optimizer: str = "adam"  # "adam" (two fp32 moments), "momentum" (one), "sgd" (none)
    mixed_precision: bool = False  # bf16 params and activations, fp32 master weights, grads and moments
    offload_optimizer: bool = False  # masters, their gradients and the moments in host memory (offload_time)
    overlap_grad_sync: bool = True  # the runtime runs gradient sync concurrently with backward
    # gradient sync message size, in buckets as the runtime packs them (the gradients are views
    # into them: no copy); None = one in-place collective per parameter tensor
    bucket_bytes: int | None = None
    overlap: float | None = None  # overlap efficiency; None = the cluster's calibrated figure
    first_rank: int = 0  # first rank of the stage whose devices and links are charged
    # Gradients accumulate over several micro-batches per step (num_microbatches > 1): ZeRO-2
    # reduce-scatters only after the last one (pcompile.runtime.zero2's expected accumulations),
    # so every full gradient of its layers is alive until then.
    accumulating: bool = False
    # Optimizer-step transient. torch's foreach Adam (its default on GPUs) materialises sqrt(v)
    # for every parameter at once: one fp32 copy of all of them; the per-tensor loop (its
    # default on CPUs) two temporaries of one tensor at a time. None = foreach on NCCL clusters.
    optimizer_foreach: bool | None = None
    # Expert parallelism (pcompile.cost.moe): the busiest rank's routed rows over the mean, which
    # every rank of the ep group waits for; 1 = uniform routing (what the search assumes)
    expert_imbalance: float = 1.0

    def __post_init__(self):
        if self.optimizer not in MOMENTS:
            raise PcompileError(f"unknown optimizer {self.optimizer!r}", f"use one of {sorted(MOMENTS)}")
        if not self.expert_imbalance >= 1.0:
            raise PcompileError(f"expert_imbalance={self.expert_imbalance} is below 1 (the busiest rank's load over "
                                "the mean)", "use 1.0 for uniform routing, or the measured max / mean expert load")

    def foreach(self, cluster: Cluster) -> bool:
        """Whether the optimizer step runs foreach (every layer's step_temp at once)."""
        return cluster.backend == "nccl" if self.optimizer_foreach is None else self.optimizer_foreach

    def state_bytes(self) -> tuple[float, float, float]:
        """(parameter, gradient, optimizer) bytes per parameter element.

        Mixed precision as pcompile.runtime.precision runs it (Megatron's bf16 default): the module's
        bf16 parameters, fp32 master gradients (the bf16 ones are cast and freed after backward,
        and the dp all-reduce moves the fp32 ones), the fp32 master copy + moments: 2 + 4 + 12."""
        moments = MOMENTS[self.optimizer]
        if self.mixed_precision:
            return 2.0, 4.0, 4.0 * (moments + 1)
        return 4.0, 4.0, 4.0 * moments

    @staticmethod
    def runtime(mixed_precision: bool = False, offload_optimizer: bool = False) -> "CostOptions":
        """What pcompile's runtime does (pcompile.runtime.grad_sync): dp gradients all-reduced in
        GRAD_BUCKET_BYTES buckets (the first FIRST_BUCKET_BYTES, as DDP) issued during backward
        as their gradients are ready. The search and forced plans are costed with these."""
        return CostOptions(mixed_precision=mixed_precision, overlap_grad_sync=True, bucket_bytes=GRAD_BUCKET_BYTES,
                           offload_optimizer=offload_optimizer)

    @property
    def activation_scale(self) -> float:
        """Activation / moved-byte scale relative to the fp32 IR."""
        return 0.5 if self.mixed_precision else 1.0


@dataclass(frozen=True)
class StageLayout:
    """The ranks a strategy runs on in a stage, as far as its prices depend on them: the devices
    (every rank waits for the slowest), and the tp and dp groups reduced to one group per
    distinct (link kind, size) - all Cluster.collective_time reads of a list of groups. Built
    once per (stage, strategy) it spares each price a walk over every rank of the stage, and
    it keeps the collective times it was asked for."""

    devices: frozenset
    tp_groups: tuple[tuple[int, ...], ...]
    dp_groups: tuple[tuple[int, ...], ...]
    _times: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def slowest_memory(self):
        """The device of the lowest memory bandwidth (the tp copies' pace)."""
        return min(self.devices, key=lambda d: d.memory_bandwidth)

    def collective_time(self, cluster: Cluster, op: str, nbytes: float, axis: str, work_only: bool = False) -> float:
        """cluster.collective_time of `op` over this layout's "tp" or "dp" groups."""
        key = (op, nbytes, axis, work_only)
        got = self._times.get(key)
        if got is None:
            got = self._times[key] = cluster.collective_time(op, nbytes, self.tp_groups if axis == "tp"
                                                             else self.dp_groups, work_only)
        return got


def distinct_groups(cluster: Cluster, groups) -> tuple[tuple[int, ...], ...]:
    """One group of each (link kind, size) among `groups`: Cluster.collective_time over them
    equals the time over all of `groups` (the slowest group's, which only these two decide)."""
    found: dict[tuple[str, int], tuple[int, ...]] = {}
    for group in groups:
        found.setdefault((cluster.link_kind(group), len(group)), tuple(group))
    return tuple(found.values())


def stage_layout(cluster: Cluster, first: int, s: Strategy) -> StageLayout:
    """The StageLayout of strategy `s` on the stage starting at rank `first`."""
    tp_groups, dp_groups = stage_groups(first, s.dp, s.tp)
    devices = frozenset(cluster.device_of(r) for r in range(first, first + s.num_devices))
    return StageLayout(devices, distinct_groups(cluster, tp_groups), distinct_groups(cluster, dp_groups))


@dataclass(frozen=True)
class LayerMemory:
    """One layer's memory under one strategy, bytes per device (a breakdown of the CostTable)."""

    params: float
    grads: float
    optimizer: float
    activations: float  # per in-flight micro-batch
    temp: float  # while the layer runs (forward or backward)
    step_temp: float = 0.0  # during the optimizer step
    # the gradients appear during the layer's backward, as its activations go (ZeRO-3's and
    # ZeRO-2's reduced shards in a step of one micro-batch), not from backward's start (the
    # dp buckets) or the first micro-batch (accumulation): table_entries
    grads_in_backward: bool = False


# -- compute -------------------------------------------------------------------------------------
def matmul_rate(device, flops: float) -> float:
    """Achieved FLOP/s for a matmul of `flops`: log-log interpolation of the measured curve."""
    curve = device.matmul_curve
    if not curve:
        return device.peak_flops
    xs = np.log([p[0] for p in curve])
    ys = np.log([p[1] for p in curve])
    return float(np.exp(np.interp(np.log(max(flops, 1.0)), xs, ys)))


def linear_rate(device, intensity: float) -> float:
    """Achieved FLOP/s of a Linear of `intensity` FLOPs per byte (input + weight + output):
    log-log interpolation of the measured linear curve (inf without one)."""
    curve = device.linear_curve
    if not curve or intensity <= 0:
        return math.inf
    xs = np.log([p[0] for p in curve])
    ys = np.log([p[1] for p in curve])
    return float(np.exp(np.interp(np.log(intensity), xs, ys)))


def op_time(device, flops: float, moved: float, chunks: int = 1, overhead: float | None = None,
            linear: bool = False, elements: float = 0.0, element_rate: float = 0.0) -> float:
    """Roofline of one op run as `chunks` equal pieces, plus a fixed overhead per piece. A
    Linear's rate is also capped by the device's linear curve at its arithmetic intensity
    (FLOPs / `moved`, the bytes of its input, weight and output: few rows per weight run
    slower than a square matmul of the same FLOPs, `Device.linear_curve`). A transcendental
    elementwise op of `elements` takes at least elements / `element_rate` (its measured
    elements/s; 0 = unknown, the roofline alone)."""
    overhead = device.op_overhead if overhead is None else overhead
    piece = flops / chunks
    rate = matmul_rate(device, piece)
    if linear and moved > 0:
        rate = min(rate, linear_rate(device, flops / moved))
    compute = piece / rate if flops > 0 else 0.0
    if elements > 0 and element_rate > 0:
        compute = max(compute, elements / chunks / element_rate)
    return chunks * (overhead + max(compute, moved / chunks / device.memory_bandwidth))


def compute_times(work: LayerWork, device, scale: float, s: Strategy, act: float) -> tuple[float, float]:
    """(forward, backward) compute seconds of the layer's ops with `scale` x the example batch.
    Backward does twice the work of forward: a matmul's input and weight gradients are two
    matmuls (two backward ops' overhead), an elementwise op reads and writes twice the bytes.
    A GELU is also charged its elements at the device's measured forward / backward GELU rates
    (Device.gelu_rate, gelu_backward_rate) where those are slower than the roofline."""
    fwd = bwd = 0.0
    for w in work.ops:
        k = s.split if w.linear else 1
        div = s.tp if (s.sp and w.sp) else 1
        flops, moved = w.flops * scale / div, (w.moved * scale / div + w.param_moved) * act
        elements = w.transcendental * scale / div
        fwd += op_time(device, flops, moved, k, linear=w.linear, elements=elements, element_rate=device.gelu_rate)
        if w.grad:  # a Linear's two gradient matmuls have its forward's FLOPs and bytes each
            pieces = 2 * k if flops > 0 else k
            bwd += op_time(device, 2 * flops, 2 * moved, pieces, device.backward_overhead, linear=w.linear,
                           elements=elements, element_rate=device.gelu_backward_rate)
    return fwd, bwd


# -- one (layer, strategy) -----------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCost:
    fwd: float  # per micro-batch, compute + tp / sdp communication
    bwd: float
    sync: float  # per step
    comm: float  # the communication part of fwd + bwd
    memory: LayerMemory


def _exposed(comm: float, compute: float, eta: float, work: float | None = None) -> float:
    """Comm left visible when it runs alongside `compute`: its own work (`work`, the transfer's
    time without Cluster.min_transfer's wait; all of comm by default) overlaps at efficiency eta,
    max(w, m) + (1 - eta) min(w, m) - m, and the wait beyond it, which uses no CPU, hides wholly
    behind compute: at least comm - m is visible."""
    work = comm if work is None else work
    return max(work - eta * min(work, compute), comm - compute)


def layer_cost(work: LayerWork, cluster: Cluster, s: Strategy, microbatch: int, batch: int,
               options: CostOptions, layout: StageLayout | None = None, compute=compute_times) -> LayerCost:
    """`work` priced under strategy `s` (see the module docstring); `layout`: stage_layout of
    (cluster, options.first_rank, s), computed when not given; `compute`: compute_times or a
    memo of it (pcompile.cost.stage_costs: many (micro-batch, dp) pairs give one rank the same
    samples)."""
    layout = layout or stage_layout(cluster, options.first_rank, s)
    devices = layout.devices
    eta = cluster.overlap if options.overlap is None else options.overlap
    act = options.activation_scale
    scale = microbatch / batch / s.dp  # samples of one rank relative to the example batch
    # every rank waits for the slowest, each computing at the plan's precision (Device.at_precision)
    times = [compute(work, d.at_precision(options.mixed_precision), scale, s, act) for d in devices]
    fwd, bwd = max(t[0] for t in times), max(t[1] for t in times)
    tp_fwd = tp_bwd = 0.0
    if s.tp > 1:  # the same for every sdp / checkpoint / split choice: kept on the layout (the
        # compute times only pace the wake-up cost, which presets do not have)
        key = ("tp", id(work), s.sp, scale, act) + ((fwd, bwd) if cluster.wakeup else ())
        if key not in layout._times:
            layout._times[key] = tp_comm(work, cluster, s, layout.tp_groups, scale, act, fwd, bwd, layout)
        tp_fwd, tp_bwd = layout._times[key]
    p_bytes, g_bytes, o_bytes = options.state_bytes()
    elements = sum(work.param_numels)
    sync = sdp_fwd = sdp_bwd = 0.0
    if s.dp > 1 and s.sdp:
        # ZeRO-3 gathers and reduce-scatters in the parameters' dtype (bf16 under mixed precision);
        # per micro-batch size alike: kept on the layout
        key = ("sdp", id(work), s.split, s.checkpoint, p_bytes)
        if key not in layout._times:
            units = sdp_units(work, s.split)

            def priced(work_only: bool) -> tuple[float, list[float], list[float]]:
                gathers = [layout.collective_time(cluster, "all_gather", n * p_bytes, "dp", work_only)
                           for n, _ in units]
                # a checkpointed layer's ops run plainly: its recompute gathers again (charged below), no re-gather
                regathers = [t if again and not s.checkpoint else 0.0 for t, (_, again) in zip(gathers, units)]
                return sum(gathers), regathers, [layout.collective_time(cluster, "reduce_scatter", n * p_bytes, "dp",
                                                                        work_only) for n, _ in units]
            (gather, regathers, scatters), (gather_w, regathers_w, scatters_w) = priced(False), priced(True)
            # in backward unit k's reduce-scatter is in flight while the unit before it re-gathers:
            # their waits run at once (their work, on the same cores, one after the other)
            layout._times[key] = (gather, gather_w, sum(max(g, r) for g, r in zip(regathers, scatters)),
                                  sum(regathers_w) + sum(scatters_w))
        gather, gather_w, backward_comm, backward_w = layout._times[key]
        sdp_fwd = _exposed(gather, fwd, eta, gather_w)
        sdp_bwd = _exposed(backward_comm, bwd, eta, backward_w)
    elif s.dp > 1 and s.zero2:
        fp32 = 4.0  # the chunks and the reduced gradients are fp32 (the masters') under mixed precision too
        bucket = float(options.bucket_bytes or GRAD_BUCKET_BYTES)
        scatter, scatter_w = (elements * fp32 / bucket * layout.collective_time(cluster, "reduce_scatter", bucket,
                                                                                 "dp", w) for w in (False, True))
        gather = elements * fp32 / bucket * layout.collective_time(cluster, "all_gather", bucket, "dp")
        passes = 2 * elements * fp32 * 2 / min(d.memory_bandwidth for d in devices)  # rows copy, gathered copy-out
        sync = (_exposed(scatter, bwd, eta, scatter_w) if options.overlap_grad_sync else scatter) + gather + passes
    elif s.dp > 1:
        def dp_comm(work_only: bool) -> float:
            if options.bucket_bytes:
                # the runtime packs the whole stage's gradients into shared buckets: a layer's share
                # of them, its bytes / bucket of one bucket's all-reduce (additive over layers, so the
                # search's per-layer sum is the stage's, within one bucket's latency: _stage_sync)
                return elements * g_bytes / options.bucket_bytes * layout.collective_time(
                    cluster, "all_reduce", float(options.bucket_bytes), "dp", work_only)
            # one in-place all-reduce per gradient tensor
            return sum(layout.collective_time(cluster, "all_reduce", n * g_bytes, "dp", work_only)
                       for n in work.param_numels if n)
        comm = dp_comm(False)
        sync = (_exposed(comm, bwd, eta, dp_comm(True)) if options.overlap_grad_sync else comm) + _bucket_divide(
            elements * g_bytes, devices, options.bucket_bytes)
    fwd_comm = tp_fwd + sdp_fwd
    recompute = (fwd + fwd_comm) if s.checkpoint else 0.0
    bwd_comm = tp_bwd + sdp_bwd + (fwd_comm if s.checkpoint else 0.0)
    shard = s.dp if s.sdp else 1
    saved = (work.saved_sp if s.sp else work.saved) * scale * act
    kept = work.input_bytes * scale * act / (s.tp if s.sp else 1) if s.checkpoint else saved
    gathered = 0.0
    if s.sdp and s.dp > 1:  # one FSDP unit per layer; with split k, one 1/k slice of a Linear at a time
        units = sdp_units(work, s.split)
        unit = max((n for n, _ in units), default=0.0)
        # the previous unit's activations: the layer's, shared among its units
        gathered = sdp_transient(unit * p_bytes, unit * _sdp_grad_bytes(options), s.dp,
                                 freed=kept / max(len(units), 1))
    temp = 2 * work.largest_output * scale * act + gathered + (saved if s.checkpoint else 0.0)
    optimizer, states = elements * o_bytes / shard, shard
    if s.zero2 and s.dp > 1:
        # the layer's full fp32 gradients as backward makes them (already in `grads` when they
        # accumulate), and pcompile.runtime.zero2's IN_FLIGHT buckets' rows being reduce-scattered:
        # those are earlier-finished layers' gradients, whose activations are gone - less the
        # previous layer's (a layer's own, as for the neighbours' sizes)
        bucket = min(elements * 4.0, float(options.bucket_bytes or GRAD_BUCKET_BYTES))
        temp += (0.0 if options.accumulating else elements * 4.0) + max(ZERO2_IN_FLIGHT * bucket - kept, 0.0)
        masters = 4.0 if options.mixed_precision else 0.0  # MasterWeights keeps every master whole
        optimizer = elements * (masters + (o_bytes - masters) / s.dp + 4.0 / s.dp)  # + the fp32 chunk
        states = s.dp
    full_grads = s.zero2 and options.accumulating  # ZeRO-2's full gradients wait for the last micro-batch
    memory = LayerMemory(params=elements * p_bytes / shard, grads=elements * g_bytes / (1 if full_grads else states),
                         optimizer=optimizer, activations=kept, temp=temp,
                         step_temp=_step_temp(work, options, cluster) / states,
                         grads_in_backward=s.sharded_grads and not options.accumulating)
    if options.offload_optimizer:  # Plan._check_offload: sdp wherever dp > 1, so shard = the dp degree
        sync += offload_time(elements / shard, p_bytes, devices)
        # every gradient leaves for the host as backward finishes it: one parameter's at a time
        memory = replace(memory, grads=0.0, optimizer=0.0, step_temp=0.0,
                         temp=temp + work.largest_param * p_bytes / shard)
    return LayerCost(fwd + fwd_comm, bwd + tp_bwd + sdp_bwd + recompute, sync, fwd_comm + bwd_comm, memory)


def _bucket_divide(grad_bytes: float, devices, bucket: int | None) -> float:
    """Seconds of the memory pass bucketed gradient sync makes besides the collective
    (pcompile.runtime.grad_sync): the gradients are views into the buckets (no flatten, no
    copy back), divided by dp in place after the all-reduce: a read and a write of every byte,
    2 x the gradient bytes at the slowest device's bandwidth."""
    if not bucket:
        return 0.0
    return 2 * grad_bytes / min(d.memory_bandwidth for d in devices)


def sdp_transient(unit: float, grads: float, dp: int, freed: float = 0.0) -> float:
    """ZeRO-3's transient bytes around a unit of `unit` gathered parameter bytes and `grads`
    gradient bytes (pcompile.runtime.sdp's stated peak, in backward, neighbours of the same size):
    the unit's parameters and gradients, the next unit's re-gather in flight (output and flat
    input: 1 + 1/dp) and the previous unit's reduce-scatter in flight (input and output) - less
    `freed`, that previous unit's activations (a unit's own, as for the neighbours' sizes): its
    backward is done, so they are gone while its gradients are reduce-scattered, though the stage
    peak (states + every activation + the largest transient) still counts them."""
    return unit + grads + unit * (1 + 1 / dp) + max(grads * (1 + 1 / dp) - freed, 0.0)


def _sdp_grad_bytes(options: "CostOptions") -> float:
    """Bytes per element of a gathered unit's gradients: the compute dtype's (bf16 under mixed
    precision: the fp32 masters receive the reduce-scattered shards)."""
    return options.state_bytes()[0]


def sdp_units(work: LayerWork, split: int) -> list[tuple[float, bool]]:
    """(elements, re-gathered in backward) of each ZeRO-3 unit of the layer, as the
    sharded_data_parallel pass builds them: each unit is one all-gather of its concatenated
    shards in forward and one reduce-scatter in backward, plus a re-gather in backward when an
    op saved a gathered weight (except the graph's last unit, kept from forward to backward).
    Unsplit: the layer is one unit (its parameters charged once: a tied weight shares the first
    reader's unit). Split k: every op reading parameters is a unit, a Linear k units of 1/k."""
    if split == 1:
        return [(float(sum(work.param_numels)), any(r.saves for r in work.reads) and not work.last)]
    pieces = [split if r.linear else 1 for r in work.reads]
    units = [(r.numel / k, r.saves) for r, k in zip(work.reads, pieces) for _ in range(k)]
    if work.last and units:
        units[-1] = (units[-1][0], False)
    return units


def _step_temp(work: LayerWork, options: CostOptions, cluster: Cluster) -> float:
    """fp32 bytes the optimizer step allocates for this layer (see CostOptions.optimizer_foreach)."""
    if not MOMENTS[options.optimizer]:
        return 0.0
    return 4.0 * sum(work.param_numels) if options.foreach(cluster) else 2 * 4.0 * work.largest_param


def sync_buckets(numels, bytes_per: float, bucket: int) -> list[float]:
    """The gradient buckets of the runtime's dp sync (pcompile.runtime.buckets: whole tensors in
    reverse order, the order backward makes them, packed until a bucket reaches its cap: the
    first FIRST_BUCKET_BYTES at most, the others `bucket`), in bytes, in the order they are issued."""
    sizes = [n * bytes_per for n in reversed(list(numels))]
    return [sum(sizes[a:b]) for a, b in bucket_ranges(sizes, bucket)]


def switch_time(cluster: Cluster, nbytes: float, a: Strategy, b: Strategy, first: int, groups=None) -> float:
    """Resharding the boundary activation from layer strategy `a` to `b` (forward + backward).

    A rank holds 1/n of the micro-batch's boundary tensor, n = dp (x tp with sp). With tp
    innermost the finer layout nests inside the coarser one, so going finer is a local slice
    (its backward all-gathers the gradient) and going coarser an all-gather: either way one
    all-gather over n_fine / n_coarse ranks spaced devices / n_fine apart. `groups`: those groups
    (or distinct_groups of them), computed when not given."""
    na, nb = a.dp * (a.tp if a.sp else 1), b.dp * (b.tp if b.sp else 1)
    if na == nb:
        return 0.0
    fine, coarse = max(na, nb), min(na, nb)
    if groups is None:
        groups = regroup_groups(a.num_devices, coarse, fine, first)
    return cluster.collective_time("all_gather", nbytes / coarse, groups)


# -- the table -----------------------------------------------------------------------------------
def cost_table(ir: IR, cluster: Cluster, devices_per_stage: int, microbatch_size: int,
               strategies, options: CostOptions | None = None) -> CostTable:
    """Per-layer, per-strategy costs of one stage of `devices_per_stage` devices (from
    options.first_rank). Impossible pairs (dp * tp != devices, micro-batch not divisible by dp)
    get time = inf."""
    options = options or CostOptions()
    strategies = tuple(strategies)
    if options.first_rank + devices_per_stage > cluster.num_devices:
        raise PcompileError(f"a stage of {devices_per_stage} devices from rank {options.first_rank} does not fit "
                            f"the cluster's {cluster.num_devices} devices", "lower devices_per_stage or first_rank")
    layers = tuple(ir.layers)
    L, S = len(layers), len(strategies)
    batch = example_batch(ir)
    works = {}
    arrays = {k: np.zeros((L, S)) for k in ("fwd", "bwd", "sync", "state", "act", "temp")}
    for j, s in enumerate(strategies):
        valid = s.num_devices == devices_per_stage and microbatch_size % s.dp == 0
        for i, layer in enumerate(layers):
            if not valid:
                for key in ("fwd", "bwd", "sync"):
                    arrays[key][i, j] = np.inf
                continue
            key = (s.tp, layer)
            if key not in works:
                works.update({(s.tp, name): w for name, w in layer_work(ir, s.tp).items()})
            c = layer_cost(works[key], cluster, s, microbatch_size, batch, options)
            values = table_entries(c, options.foreach(cluster))
            for name, value in zip(("fwd", "bwd", "sync", "state", "act", "temp"), values):
                arrays[name][i, j] = value
    bounds = np.array(boundary_bytes(ir), dtype=float) * microbatch_size / batch * options.activation_scale
    switch = np.zeros((max(L - 1, 0), S, S))
    for i in range(L - 1):
        for a, sa in enumerate(strategies):
            for b, sb in enumerate(strategies):
                if sa.num_devices == sb.num_devices == devices_per_stage:
                    switch[i, a, b] = switch_time(cluster, bounds[i], sa, sb, options.first_rank)
    return CostTable(layers=layers, strategies=strategies, devices_per_stage=devices_per_stage,
                     microbatch_size=microbatch_size, fwd_time=arrays["fwd"], bwd_time=arrays["bwd"],
                     sync_time=arrays["sync"], state_memory=arrays["state"], activation_memory=arrays["act"],
                     temp_memory=arrays["temp"], switch_time=switch, boundary_bytes=bounds)


def table_entries(c: LayerCost, foreach: bool) -> tuple[float, float, float, float, float, float]:
    """(fwd, bwd, sync, state, act, temp): a layer's CostTable cell.

    The optimizer step's transient (LayerMemory.step_temp) comes after backward, when the
    activations are freed: peak = states + max(backward's act + temp, the step's). Run one
    tensor at a time it is a per-layer max, folded exactly into temp. Run foreach (every layer's
    at once, torch's default on GPUs) it is a sum over the stage, which the knapsack's single
    memory constraint cannot take as a max: it is charged with the states, over-charging a plan
    by at most min(its activations + temp, the step's transient).

    Gradients that appear during the layer's backward (LayerMemory.grads_in_backward: one
    micro-batch, so one set of activations in flight) are there only once the activations of
    the layers after it are gone: walking backward, layer l's peak holds the gradients of l and
    the layers after it and the activations of l and the layers before it, which is at most
    sum_i max(act_i, grads_i) + min(act_l, grads_l): charged as the activations (max) and, for
    the layer running, the transient (min) - exactly the walk's when they are the same size, and
    never less than the optimizer step's sum of gradients."""
    m = c.memory
    late = m.grads if m.grads_in_backward else 0.0
    state = m.params + m.grads - late + m.optimizer + (m.step_temp if foreach else 0.0)
    act, temp = max(m.activations, late), m.temp + min(m.activations, late)
    return c.fwd, c.bwd, c.sync, state, act, temp if foreach else max(temp, m.step_temp)


def stage_memory_budget(cluster: Cluster, first_rank: int, devices: int) -> int:
    """The memory a stage's plan must fit: its smallest device's budget (never an average)."""
    return min(cluster.device_of(r).budget for r in range(first_rank, first_rank + devices))


# -- the first search's uniform estimate (kept for passes/search.py) -----------------------------
def ring_allreduce_time(num_bytes: float, group_size: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce: 2 (n-1) latency + 2 (n-1)/n * bytes / bandwidth."""
    if group_size <= 1 or num_bytes <= 0:
        return 0.0
    steps = 2 * (group_size - 1)
    return steps * latency + steps / group_size * num_bytes / bandwidth


def _loss_sync(cluster: Cluster, s: Strategy, first: int) -> float:
    """The runtime averages the step's fp32 loss over dp: one 4-byte all-reduce per step (on
    gloo with 4 ranks sharing 2 cores its latency alone is ~4 ms, the profile's fit)."""
    return cluster.collective_time("all_reduce", 4.0, stage_groups(first, s.dp, s.tp)[1]) if s.dp > 1 else 0.0


def _stage_sync(cluster: Cluster, s: Strategy, options: CostOptions, numels: list[int], backward: float) -> float:
    """Bucketed dp gradient sync of a whole stage: the runtime packs every layer's gradients
    into the same buckets (one all-reduce for a small model, not one per layer), plus the
    in-place divide (`_bucket_divide`). Overlapped (options.overlap_grad_sync): bucket i is
    ready when backward has made its share of the gradient bytes (backward's time spread over
    them), issued then or when the previous one is done; the exposed time is what runs past
    backward's end - at least the last bucket's - blended with the unoverlapped sum by the
    overlap efficiency eta: (1 - eta) sum + eta exposed, for the transfers' own work; a wait
    beyond it (Cluster.min_transfer: no CPU) shows only past backward's end."""
    first = options.first_rank
    sizes = sync_buckets(numels, options.state_bytes()[1], options.bucket_bytes)
    groups = stage_groups(first, s.dp, s.tp)[1]
    times = [cluster.collective_time("all_reduce", b, groups) for b in sizes]
    comm = sum(times)
    devices = {cluster.device_of(r) for r in range(first, first + s.num_devices)}
    exposed = comm
    if options.overlap_grad_sync:
        eta = cluster.overlap if options.overlap is None else options.overlap

        def past_backward(bucket_times: list[float]) -> float:
            total, made, done = sum(sizes) or 1.0, 0.0, 0.0
            for size, time in zip(sizes, bucket_times):
                made += size
                done = max(done, backward * made / total) + time
            return max(done - backward, 0.0)
        # the transfers' own work overlaps at eta; a wait beyond it (Cluster.min_transfer) hides wholly
        work = [cluster.collective_time("all_reduce", b, groups, work_only=True) for b in sizes]
        exposed = max((1 - eta) * sum(work) + eta * past_backward(work), past_backward(times))
    return exposed + _bucket_divide(sum(sizes), devices, options.bucket_bytes)


def estimate_uniform(ir: IR, cluster: Cluster, strategy: Strategy, options: CostOptions | None = None) -> Estimate:
    """One strategy for every layer, one micro-batch = the example batch: the layer costs
    summed (with bucketed dp sync, the stage's buckets: `_stage_sync`), peak memory by
    `pcompile.search.schedules.backward_peak`."""
    options = options or CostOptions()
    batch = example_batch(ir)
    works = layer_work(ir, strategy.tp)
    costs = [layer_cost(works[layer], cluster, strategy, batch, batch, options) for layer in ir.layers]
    bucketed = strategy.dp > 1 and not strategy.sdp and not strategy.zero2 and options.bucket_bytes
    numels = [n for layer in ir.layers for n in works[layer].param_numels]
    backward = sum(c.bwd for c in costs)
    sync = _stage_sync(cluster, strategy, options, numels, backward) if bucketed else sum(c.sync for c in costs)
    comm = sum(c.comm for c in costs) + sync + _loss_sync(cluster, strategy, options.first_rank)
    compute = sum(c.fwd + c.bwd for c in costs) - sum(c.comm for c in costs)
    memories = [c.memory for c in costs]
    peak = backward_peak(memories, in_flight=1, foreach=options.foreach(cluster))
    budget = stage_memory_budget(cluster, options.first_rank, strategy.num_devices)
    return Estimate(step_time=compute + comm, peak_memory=int(peak), compute_time=compute, comm_time=comm,
                    memory_budget=budget)
