"""The plan search's space: per-layer strategies, pipeline settings, pruning rules, and the
closed-form objective every search (DP, baselines, the tests' exhaustive oracle) minimises.

A plan = a Setting (pp, micro-batch count m, schedule, chunks v) + a contiguous stage
partition of the layers ("pre", blocks..., "post") + one Strategy per layer. Ranks are laid
out pp outermost (stage k owns ranks [k d, (k+1) d), d = devices per stage), then dp, tp
innermost, so tp groups are contiguous ranks (inside a node when tp <= devices per node).

Objective (per stage k, costs read from stage k's CostTable at micro-batch size B/m):
  T_k   = sum_l (fwd + bwd)[l, s_l] + sum of switch[l, s_l, s_l+1] inside each chunk
          + p2p of every boundary it sends on (activation forward + its gradient back)
  S_k   = sum_l sync[l, s_l]                      (per-step gradient sync, after the last backward)
  mem_k = sum_l state[l, s_l] + r_k * sum_l act[l, s_l] + max_l temp[l, s_l]
          r_k = micro-batches in flight (pipeline_cost.peak_in_flight of the schedule's op order:
          GPipe m, 1F1B min(pp - k, m), interleaved Megatron's warm-up / v)
  step  = max_k (c * T_k + S_k),  c = m + pp - 1 (GPipe, 1F1B), m + (pp - 1) / v (interleaved)
This is the textbook bubble formula charged at the bottleneck stage: equal to
pipeline_cost.simulate for equal stages, an upper bound of it without gradient sync
(sum_k T_k + (m - 1) max_k T_k <= (m + pp - 1) max_k T_k), and - being a max of per-stage
terms - exactly optimisable by a min-max partition DP over per-stage knapsacks. Known gap:
a stage that is not the slowest but has the largest sync starts it after the drain, which
the simulator sees and this formula does not (the simulation stays <= c max T + max S).
A plan fits when mem_k <= stage k's budget (its smallest device) for every k.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pcompile.errors import PcompileError
from pcompile.plan import Estimate, Strategy
from pcompile.search.costtable import CostTable
from pcompile.search.schedules import SCHEDULES, peak_in_flight, schedule_order


@dataclass(frozen=True)
class SearchRules:
    """Galvatron's decision tree, restated as switchable pruning rules (True = prune).

    Always enforced (no flag: they only remove duplicates): sp needs tp > 1 (sp with tp = 1
    is the plain layer); sdp and zero2 need dp > 1 (ZeRO over one rank is plain dp); a layer is
    dp, zero2 or sdp, never a mix (one mode per Strategy, as in Galvatron)."""

    tp_within_node: bool = True
    """tp <= devices per node. tp all-reduces (or all-gathers + reduce-scatters) activations
    two to four times per layer per micro-batch; across nodes the link is ~10x slower, so a tp
    group that spans nodes loses to dp or pp over the same devices."""

    pp_across_nodes: bool = True
    """On a multi-node cluster, pp <= number of nodes: stages split nodes apart before they
    split a node. pp only sends one boundary activation per micro-batch (cheap on the slow
    inter-node link) while tp and dp inside a stage then run on the fast intra-node links."""

    power_of_two: bool = True
    """tp and pp are powers of two: collectives and the head / hidden sizes of real models
    divide evenly, and rings of other sizes are measured slower on NVLink / NCCL."""

    split_only_with_sdp: bool = True
    """Operator split k > 1 only on sdp (ZeRO-3) layers. Splitting's purpose (OSDP) is to gather
    1/k of a sharded weight at a time; on a dp layer it only adds kernel launches."""

    gpipe_dominated: bool = True
    """Drop GPipe when 1F1B is searched: under this objective both take the same step time and
    GPipe holds m micro-batches of activations where 1F1B holds min(pp - k, m)."""

    microbatches_at_least_pp: bool = True
    """With pp > 1, m >= pp: with fewer micro-batches than stages some stage idles during the
    whole step (bubble >= (pp - m) / pp)."""


@dataclass(frozen=True)
class SearchSpace:
    """The options a caller can narrow (None = every value the rules allow)."""

    tp_degrees: tuple[int, ...] | None = None  # tp that divides heads / hidden sizes (caller's predicate)
    pp_degrees: tuple[int, ...] | None = None
    microbatch_counts: tuple[int, ...] | None = None  # None: every divisor of the global batch
    schedules: tuple[str, ...] = SCHEDULES
    virtual_stages: tuple[int, ...] = (2,)  # chunks per device for interleaved 1F1B
    splits: tuple[int, ...] = (1, 2, 4)
    sdp: tuple[bool, ...] = (False, True)
    zero2: tuple[bool, ...] = (False, True)  # ZeRO-2 (dp > 1, not with sdp)
    sp: tuple[bool, ...] = (False, True)
    checkpoint: tuple[bool, ...] = (False, True)
    # expert parallelism degrees (1 = none). The engine cannot know which layers hold experts:
    # the caller offers ep > 1 only for models with a mixture of experts and marks it impossible
    # in the other layers' table rows (passes/search_runs.py), one ep > 1 per run (the runtime
    # runs one ep degree per plan). (1,) turns it off.
    ep: tuple[int, ...] = (1,)

    def __post_init__(self):
        unknown = [s for s in self.schedules if s not in SCHEDULES]
        if unknown:
            raise PcompileError(f"unknown pipeline schedule(s) {unknown}", f"use some of {SCHEDULES}")
        bad = [e for e in self.ep if not isinstance(e, int) or isinstance(e, bool) or e < 1]
        if bad:
            raise PcompileError(f"search space ep={self.ep}: {bad} are not positive integers",
                                "give expert-parallel degrees of 1 or more, e.g. ep=(1, 4); ep=(1,) turns it off")


@dataclass(frozen=True)
class Setting:
    """The global choices of a plan: pp, micro-batches m, schedule and chunks per device v."""

    pp: int
    microbatches: int
    schedule: str = "1F1B"
    chunks: int = 1

    @property
    def coefficient(self) -> float:
        """Micro-batch slots the bottleneck stage's T_k is charged for (bubble included)."""
        return self.microbatches + (self.pp - 1) / self.chunks

    def in_flight(self, stage: int) -> float:
        return _in_flight(self.schedule, self.pp, self.microbatches, stage, self.chunks)

    def describe(self) -> str:
        text = f"pp{self.pp} m{self.microbatches}"
        if self.pp > 1:
            text += f" {self.schedule}" + (f"(v={self.chunks})" if self.chunks > 1 else "")
        return text


@functools.lru_cache(maxsize=65536)
def _in_flight(schedule: str, pp: int, m: int, stage: int, chunks: int) -> float:
    # In closed form, what walking the schedule's op order gives (schedules.schedule_order: a
    # 1024-micro-batch order is thousands of ops, per stage): GPipe holds all m; 1F1B and
    # interleaved 1F1B hold their warm-up's forwards plus the one of the first F/B pair (all of
    # them when the warm-up is the whole step), each chunk's forward 1/chunks of a micro-batch
    if schedule == "GPipe" and m > 0 and chunks == 1:
        return float(m)
    if schedule == "1F1B" and m > 0 and chunks == 1:
        return float(min(pp - stage, m))
    if schedule == "Interleaved1F1B" and m > 0 and m % pp == 0:
        total = m * chunks
        warm = min((pp - stage - 1) * 2 + (chunks - 1) * pp, total)
        return min(warm + 1, total) / chunks
    return peak_in_flight(schedule_order(schedule, pp, m, stage, chunks), chunks)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pow2(n: int) -> bool:
    return n & (n - 1) == 0


def tp_options(devices: int, devices_per_node: int, space: SearchSpace, rules: SearchRules) -> list[int]:
    out = []
    for tp in _divisors(devices):
        if space.tp_degrees is not None and tp not in space.tp_degrees:
            continue
        if (rules.tp_within_node and tp > devices_per_node) or (rules.power_of_two and not _pow2(tp)):
            continue
        out.append(tp)
    return out


def strategies_for(devices: int, devices_per_node: int, microbatch_size: int, space: SearchSpace,
                   rules: SearchRules) -> tuple[Strategy, ...]:
    """Every per-layer Strategy of a stage of `devices` whose dp divides the micro-batch. ep > 1
    (space.ep) where it divides dp, as the runtime runs it: with plain dp (not ZeRO-3 / ZeRO-2),
    without operator split (both refused by passes/expert_parallel.py) and without sp (not run
    with ep by any test: not offered)."""
    out = []
    for tp in tp_options(devices, devices_per_node, space, rules):
        dp = devices // tp
        if microbatch_size % dp:
            continue
        # the dp group's mode: replicate (dp), shard everything (sdp, ZeRO-3), or shard gradients
        # and optimizer states only (zero2, ZeRO-2), listed last so it wins no tie it did not before
        modes = [(sdp, False) for sdp in space.sdp] + [(False, True) for z2 in space.zero2 if z2]
        if dp == 1:  # ZeRO over one rank is the plain layer, whichever modes the space narrows to
            modes = [(False, False)]
        for sdp, zero2 in modes:
            for sp in space.sp:
                if sp and tp == 1:
                    continue
                for ckpt in space.checkpoint:
                    for split in space.splits:
                        if split > 1 and rules.split_only_with_sdp and not sdp:
                            continue
                        for ep in space.ep:
                            if ep > 1 and (dp % ep or sdp or zero2 or split > 1 or sp):
                                continue
                            out.append(Strategy(dp=dp, tp=tp, sdp=sdp, sp=sp, checkpoint=ckpt, split=split,
                                                zero2=zero2, ep=ep))
    return tuple(out)


def split_layers(layers: tuple[str, ...]) -> tuple[int, int]:
    """(first block index, end of blocks): "pre" and "post" are layers but not blocks."""
    start = 1 if layers and layers[0] == "pre" else 0
    stop = len(layers) - 1 if len(layers) > start and layers[-1] == "post" else len(layers)
    return start, stop


def settings(num_devices: int, devices_per_node: int, global_batch: int, layers: tuple[str, ...],
             space: SearchSpace, rules: SearchRules) -> list[Setting]:
    """Every (pp, m, schedule, v) the rules allow; the caller drops those with no strategy."""
    num_nodes = max(1, num_devices // devices_per_node)
    start, stop = split_layers(layers)
    blocks = stop - start
    out = []
    for pp in _divisors(num_devices):
        if pp > len(layers) or (space.pp_degrees is not None and pp not in space.pp_degrees):
            continue
        if (rules.power_of_two and not _pow2(pp)) or (rules.pp_across_nodes and num_nodes > 1 and pp > num_nodes):
            continue
        for m in _divisors(global_batch):
            if space.microbatch_counts is not None and m not in space.microbatch_counts:
                continue
            if pp == 1:
                out.append(Setting(1, m))
                continue
            if rules.microbatches_at_least_pp and m < pp:
                continue
            for schedule in space.schedules:
                if schedule == "GPipe" and not (rules.gpipe_dominated and "1F1B" in space.schedules):
                    out.append(Setting(pp, m, "GPipe"))
                elif schedule == "1F1B":
                    out.append(Setting(pp, m, "1F1B"))
                elif schedule == "Interleaved1F1B" and m % pp == 0:
                    out += [Setting(pp, m, schedule, v) for v in space.virtual_stages
                            if v > 1 and blocks and blocks % (pp * v) == 0]
    return out


def batch_splits(devices: int, devices_per_node: int, batch: int, layers: tuple[str, ...], space: SearchSpace,
                 rules: SearchRules) -> bool:
    """Whether some plan of the space runs a global batch of `batch`: a setting (pp, m) with a
    strategy whose dp divides its micro-batch."""
    return any(strategies_for(devices // s.pp, devices_per_node, batch // s.microbatches, space, rules)
               for s in settings(devices, devices_per_node, batch, layers, space, rules))


def nearest_batches(devices: int, devices_per_node: int, batch: int, layers: tuple[str, ...], space: SearchSpace,
                    rules: SearchRules) -> list[int]:
    """The global batches nearest to `batch` that some plan of the space runs: the largest below
    and the smallest above (a multiple of the device count runs at dp = devices, tp = pp = 1
    when the space allows them; the scan stops `devices` away either side)."""
    def first(candidates):
        return next((b for b in candidates if batch_splits(devices, devices_per_node, b, layers, space, rules)), None)

    found = [first(range(batch - 1, max(batch - devices, 0), -1)), first(range(batch + 1, batch + devices + 1))]
    return [b for b in found if b is not None]


@functools.lru_cache(maxsize=4096)
def even_segments(layers: tuple[str, ...], pp: int, chunks: int = 1) -> tuple[tuple[tuple[int, int], ...], ...] | None:
    """Per device, its (start, stop) layer ranges when the blocks are split evenly into pp * v
    chunks (chunk c on device c mod pp; the first chunks get one block more when they do not
    divide), "pre" joining the first chunk and "post" the last. None when a chunk would be empty."""
    start, stop = split_layers(layers)
    sizes = [len(a) for a in np.array_split(np.arange(start, stop), pp * chunks)]
    bounds = [0] + [int(b) + start for b in np.cumsum(sizes)]
    bounds[-1] = len(layers)
    ranges = [(bounds[c], bounds[c + 1]) for c in range(pp * chunks)]
    if any(a >= b for a, b in ranges):
        return None
    return tuple(tuple(ranges[c] for c in range(k, pp * chunks, pp)) for k in range(pp))


def balanced_split(costs: list[float], num_stages: int, first: float = 0.0, last: float = 0.0) -> list[int]:
    """Stage of each unit: contiguous runs minimising the largest stage cost, where the first
    stage also pays `first` and the last `last`."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def seg(i: int, j: int, k: int) -> float:
        return prefix[j] - prefix[i] + (first if k == 0 else 0.0) + (last if k == num_stages - 1 else 0.0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]  # best[k][j]: units [0, j) in k stages
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n - (num_stages - k) + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], seg(i, j, k - 1))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    stages, j = [0] * n, n
    for k in range(num_stages, 0, -1):
        i = cut[k][j]
        stages[i:j] = [k - 1] * (j - i)
        j = i
    return stages


def p2p_time(table: CostTable, layer: int, bandwidth: float, latency: float) -> float:
    """Sending the activation after `layer` to the next stage and its gradient back, each dp
    replica its part over its own link (CostTable.send_split)."""
    return 2 * (latency + table.boundary_bytes[layer] / table.send_split / bandwidth)


@dataclass(frozen=True)
class PlanCost:
    step_time: float
    stage_time: tuple[float, ...]  # T_k: one micro-batch through the stage (switches and sends included)
    stage_sync: tuple[float, ...]  # S_k
    stage_memory: tuple[float, ...]  # bytes per device
    budgets: tuple[float, ...]
    in_flight: tuple[float, ...]

    @property
    def fits(self) -> bool:
        return all(m <= b for m, b in zip(self.stage_memory, self.budgets))

    def estimate(self, setting: Setting) -> Estimate:
        """The plan's Estimate: its step, its fullest stage's peak, and the compute / communication
        split of its bottleneck stage (c * T_k and S_k)."""
        c = setting.coefficient
        k = max(range(len(self.stage_time)), key=lambda j: c * self.stage_time[j] + self.stage_sync[j])
        return Estimate(step_time=self.step_time, peak_memory=int(max(self.stage_memory)),
                        compute_time=c * self.stage_time[k], comm_time=self.stage_sync[k],
                        memory_budget=int(min(self.budgets)))


def evaluate(setting: Setting, tables: list[CostTable], budgets: list[float],
             segments: tuple[tuple[tuple[int, int], ...], ...], choice: list[int],
             p2p_bandwidth: float, p2p_latency: float) -> PlanCost:
    """The objective of the module docstring for one plan (choice[l] = strategy index)."""
    c = setting.coefficient
    times, syncs, mems, flights = [], [], [], []
    last = tables[0].num_layers - 1
    for k, segs in enumerate(segments):
        tab = tables[k]
        t = sync = state = act = 0.0
        temp = 0.0
        for a, b in segs:
            for l in range(a, b):
                s = choice[l]
                t += tab.fwd_time[l, s] + tab.bwd_time[l, s]
                sync += tab.sync_time[l, s]
                state += tab.state_memory[l, s]
                act += tab.activation_memory[l, s]
                temp = max(temp, tab.temp_memory[l, s])
                if l + 1 < b:
                    t += tab.switch_time[l, s, choice[l + 1]]
            if b - 1 < last:
                t += p2p_time(tab, b - 1, p2p_bandwidth, p2p_latency)
        r = setting.in_flight(k)
        times.append(t)
        syncs.append(sync)
        mems.append(state + r * act + temp)
        flights.append(r)
    step = max(c * t + s for t, s in zip(times, syncs))
    return PlanCost(step, tuple(times), tuple(syncs), tuple(mems), tuple(budgets), tuple(flights))
