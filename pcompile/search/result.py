"""What the plan search returns: the plan, per-layer costs, runner-ups, the binding memory
constraint and the baselines, as frozen data with `explain()`, and its conversion to a Plan."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from pcompile.plan import Candidate, Estimate, LayerAssignment, Plan, Strategy
from pcompile.search.costtable import CostTable
from pcompile.search.space import PlanCost, Setting

GIB = 2**30


def size_text(num_bytes: float) -> str:
    """Bytes in the largest binary unit, rounded UP to three significant digits: "at least X"
    must be enough memory."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10), ("B", 1)):
        if num_bytes >= scale or unit == "B":
            value = num_bytes / scale
            step = 10 ** (math.floor(math.log10(value)) - 2) if value > 0 else 1
            return f"{math.ceil(value / step - 1e-9) * step:.3g} {unit}"


@dataclass(frozen=True)
class Alternative:
    """Another strategy for one layer, every other choice unchanged."""

    strategy: Strategy
    step_time: float  # predicted step time of the whole plan with it
    stage_delta: float  # change of its stage's c * T + S (seconds per step; < 0: its stage gets faster)
    peak_memory: float  # its stage's peak with it (bytes per device)
    fits: bool


@dataclass(frozen=True)
class LayerChoice:
    layer: str
    stage: int
    strategy: Strategy
    time: float  # forward + backward of one micro-batch (seconds)
    sync_time: float  # per-step gradient sync
    memory: float  # state + in-flight activations (bytes per device)
    temp_memory: float
    runner_ups: tuple[Alternative, ...]  # the best fitting alternatives, fastest first


@dataclass(frozen=True)
class StagePlan:
    stage: int
    layers: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]  # its [start, stop) layer index ranges (one per chunk)
    first_rank: int
    devices: int
    in_flight: float  # micro-batches of activations held at the peak
    microbatch_time: float  # T_k
    sync_time: float  # S_k
    peak_memory: float
    memory_budget: float


@dataclass(frozen=True)
class Baseline:
    name: str
    description: str
    step_time: float  # inf when nothing of its kind fits
    peak_memory: float  # its plan's peak; when nothing fits, the leanest of its kind's
    setting: str = ""
    strategy: Strategy | None = None  # the uniform strategy (None for per-layer baselines)

    @property
    def fits(self) -> bool:
        return math.isfinite(self.step_time)


@dataclass(frozen=True)
class SearchResult:
    setting: Setting
    microbatch_size: int
    step_time: float
    stages: tuple[StagePlan, ...]
    layers: tuple[LayerChoice, ...]
    baselines: tuple[Baseline, ...]
    binding: str  # which memory constraint shapes the plan
    certified: bool  # proven optimal despite the memory grid (see search_dp)
    gap: float  # step time / proven lower bound - 1 (0 when certified)
    grid_cells: int
    settings_searched: int  # settings whose DP ran
    settings_total: int
    seconds: float
    cost: PlanCost  # the objective's terms for the plan (search.space.evaluate)

    @property
    def peak_memory(self) -> float:
        return max(s.peak_memory for s in self.stages)

    def gain(self, name: str) -> float:
        """How many times faster than baseline `name` (inf when the baseline does not fit)."""
        base = next(b for b in self.baselines if b.name == name)
        return base.step_time / self.step_time

    def explain(self) -> str:
        s = self.setting
        lines = [f"plan: {s.describe()}, micro-batch {self.microbatch_size}, predicted step "
                 f"{self.step_time * 1e3:.2f} ms, peak {size_text(self.peak_memory)}"
                 + ("" if self.certified else f" (within {self.gap:.2%} of optimal: memory grid "
                                                f"{self.grid_cells} cells per budget)")]
        for st in self.stages:
            lines.append(f"stage {st.stage} (ranks {st.first_rank}-{st.first_rank + st.devices - 1}): "
                         f"{len(st.layers)} layers, {st.microbatch_time * 1e3:.2f} ms per micro-batch, sync "
                         f"{st.sync_time * 1e3:.2f} ms, {size_text(st.peak_memory)} of {size_text(st.memory_budget)} "
                         f"({st.in_flight:g} micro-batches in flight)")
        lines.append(f"memory: {self.binding}")
        width = max([len("layer")] + [len(c.layer) for c in self.layers]) + 2  # the longest name, then a gap
        lines.append(f"{'layer':<{width}}{'strategy':<22}{'time ms':>9}{'memory':>11}  "
                     "runner-ups (step ms / stage memory)")
        for c in self.layers:
            alts = ", ".join(f"{a.strategy.describe()} {a.step_time * 1e3:.2f}/{size_text(a.peak_memory)}"
                             for a in c.runner_ups) or "-"
            lines.append(f"{c.layer:<{width}}{c.strategy.describe():<22}{c.time * 1e3:9.3f}{size_text(c.memory):>11}  "
                         f"{alts}")
        lines.append("baselines (same cost tables):")
        for b in self.baselines:
            if b.fits:
                lines.append(f"  {b.name:<14} {b.step_time * 1e3:10.2f} ms  x{self.gain(b.name):.2f}  "
                             f"{b.description} [{b.setting}{', ' + b.strategy.describe() if b.strategy else ''}]")
            else:
                lines.append(f"  {b.name:<14} " + (f"out of memory (leanest needs {size_text(b.peak_memory)})"
                                                    if math.isfinite(b.peak_memory) else "not in the searched space")
                             + f"  {b.description}" + (f" [{b.strategy.describe()}]" if b.strategy else ""))
        # no timing: plans are byte-stable
        lines.append(f"searched {self.settings_searched} of {self.settings_total} settings")
        return "\n".join(lines)


def layer_choices(setting: Setting, tables: list[CostTable], segments, choice, cost: PlanCost,
                  top: int = 3) -> tuple[tuple[LayerChoice, ...], str]:
    """Per-layer costs and runner-ups (each alternative changes one layer, vectorised over
    strategies), and a sentence on the binding memory constraint."""
    c = setting.coefficient
    stage_values = [c * t + s for t, s in zip(cost.stage_time, cost.stage_sync)]
    out, blocked = [], []
    for k, segs in enumerate(segments):
        tab, r = tables[k], cost.in_flight[k]
        others = max([v for j, v in enumerate(stage_values) if j != k], default=0.0)
        layers = [l for a, b in segs for l in range(a, b)]
        temps = [tab.temp_memory[l, choice[l]] for l in layers]
        base_mem = cost.stage_memory[k] - max(temps)
        for pos, l in enumerate(layers):
            s = choice[l]
            dt = tab.fwd_time[l] + tab.bwd_time[l] - tab.fwd_time[l, s] - tab.bwd_time[l, s]
            for a, b in segs:
                if a < l < b:
                    dt = dt + tab.switch_time[l - 1, choice[l - 1]] - tab.switch_time[l - 1, choice[l - 1], s]
                if a <= l < b - 1:
                    dt = dt + tab.switch_time[l, :, choice[l + 1]] - tab.switch_time[l, s, choice[l + 1]]
            delta = c * dt + tab.sync_time[l] - tab.sync_time[l, s]
            w = tab.state_memory[l] + r * tab.activation_memory[l]
            rest_temp = max(temps[:pos] + temps[pos + 1:], default=0.0)
            mem = base_mem - w[s] + w + np.maximum(rest_temp, tab.temp_memory[l])
            step = np.maximum(stage_values[k] + delta, others)
            fits = mem <= cost.budgets[k]
            # the alternatives fastest first: the first `top` that fit, and the first faster one
            # that does not (what binds), found without building the others
            ups, faster = [], None
            for j in np.lexsort((delta, step)).tolist():
                if j == s or not np.isfinite(step[j]):
                    continue
                if fits[j] and len(ups) < top:
                    ups.append(Alternative(tab.strategies[j], float(step[j]), float(delta[j]), float(mem[j]), True))
                elif not fits[j] and faster is None and delta[j] < 0:
                    faster = Alternative(tab.strategies[j], float(step[j]), float(delta[j]), float(mem[j]), False)
                if len(ups) == top and faster is not None:
                    break
            if faster is not None:
                blocked.append((tab.layers[l], k, faster))
            out.append(LayerChoice(tab.layers[l], k, tab.strategies[s], float(tab.fwd_time[l, s] + tab.bwd_time[l, s]),
                                   float(tab.sync_time[l, s]), float(w[s]), float(tab.temp_memory[l, s]),
                                   tuple(ups)))
    out.sort(key=lambda x: tables[0].layers.index(x.layer))
    tight = max(range(len(segments)), key=lambda k: cost.stage_memory[k] / cost.budgets[k])
    head = f"stage {tight} is the fullest: {size_text(cost.stage_memory[tight])} of {size_text(cost.budgets[tight])}"
    if not blocked:
        return tuple(out), head + "; memory does not bind (no layer has a faster strategy that does not fit)"
    name, k, alt = min(blocked, key=lambda x: x[2].stage_delta)
    return tuple(out), (head + f"; memory binds: {len(blocked)} layer(s) would run faster with more memory, most "
                        f"{name} (stage {k}) with {alt.strategy.describe()}: {-alt.stage_delta * 1e3:.2f} ms less "
                        f"for its stage but {size_text(alt.peak_memory)} > {size_text(cost.budgets[k])}")


def to_plan(result: SearchResult, model: str = "") -> Plan:
    """The search result as a pcompile Plan (baselines become its candidates)."""
    strategies = [c.strategy for c in result.layers]
    default = Counter(strategies).most_common(1)[0][0]
    devices = result.stages[0].devices * len(result.stages)
    estimate = result.cost.estimate(result.setting)
    candidates = tuple(
        Candidate(b.strategy or default,
                  Estimate(b.step_time, int(b.peak_memory)) if b.fits else None,
                  f"baseline {b.name}: x{result.gain(b.name):.2f} slower [{b.setting}]" if b.fits else
                  (f"baseline {b.name}: out of memory (leanest needs {size_text(b.peak_memory)})"
                   if math.isfinite(b.peak_memory) else f"baseline {b.name}: not in the searched space"))
        for b in result.baselines)
    chunk_of = {}
    for st in result.stages:
        for c, (a, b) in enumerate(st.ranges):
            for layer in range(a, b):
                chunk_of[layer] = c * len(result.stages) + st.stage  # virtual stage (= stage when v = 1)
    names = [c.layer for c in result.layers]
    return Plan(num_devices=devices, default=default,
                layers=tuple(LayerAssignment(c.layer, c.strategy, chunk_of[names.index(c.layer)])
                             for c in result.layers),
                pp=result.setting.pp, num_microbatches=result.setting.microbatches,
                schedule=result.setting.schedule, virtual_stages=result.setting.chunks, model=model,
                estimate=estimate, candidates=candidates, reason=result.explain().splitlines()[0],
                explanation=result.explain())
