"""Reports of a plan: the text `pcompile plan` prints, and pictures (PNG, matplotlib: the
optional "plot" extra).

Text: the strategies, predicted step time, throughput and memory, every candidate the search
costed and the chosen plan's gain over them; rich tables on a terminal, plain when piped.

Three figures, from what the Plan and its Estimate hold (plus the IR and the cluster when
given):
  * `timeline`  — the pipeline schedule per stage: forward, backward, bubble and gradient
    communication blocks. Stages are drawn with equal costs (the Plan keeps the step's
    compute and communication totals, not per-stage costs), in the op order of the plan's
    schedule (`pipeline_cost.schedule_order`); with pp = 1 it is one stage.
  * `memory`    — per-device stacked bars (parameters, gradients, optimizer states,
    activations) against each device's budget. States come from the IR's parameters
    after the rewrite: sharded over tp by `param_shardings`, and over dp when the layer's
    strategy is sdp; an IR from before the rewrite shows unsplit states), assuming fp32 Adam
    (4 + 4 + 8 bytes per element, as the cost model does); activations are the rest of the
    predicted peak.
  * `gain`      — the predicted step time of every strategy the search costed, the chosen one
    against the others (the baselines), with the speed-up over each.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from pcompile.cluster import Cluster
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.ir.params import by_tensor
from pcompile.plan import Plan
from pcompile.search.schedules import schedule_order

GiB = 2**30
BYTES_PER_ELEMENT = {"params": 4, "grads": 4, "optimizer": 8}  # fp32 weights, grads, Adam's two moments
BACKWARD_SHARE = 2 / 3  # backward = 2 x forward
COLORS = {"F": "#4C72B0", "B": "#DD8452", "comm": "#C44E52", "bubble": "#DDDDDD",
          "params": "#4C72B0", "grads": "#55A868", "optimizer": "#8172B3", "activations": "#DD8452"}


@dataclass(frozen=True)
class Block:
    stage: int
    kind: str  # "F", "B" or "comm"
    microbatch: int
    start: float
    length: float


@dataclass(frozen=True)
class DeviceMemory:
    rank: int
    params: float
    grads: float
    optimizer: float
    activations: float
    budget: float


# -- data ------------------------------------------------------------------------------------
def schedule_blocks(plan: Plan) -> list[Block]:
    """Each stage's F/B ops at their start times (equal stages, free sends), then its gradient sync."""
    estimate = plan.estimate
    if estimate is None:
        raise PcompileError("the plan has no estimate to draw a timeline from", "plot a plan made by pcompile.plan()")
    pp, m = plan.pp, max(1, plan.num_microbatches)
    schedule = "1F1B" if plan.schedule == "Interleaved1F1B" else plan.schedule  # drawn without chunks
    compute = estimate.compute_time or max(0.0, estimate.step_time - estimate.comm_time)
    # The estimate's compute covers every micro-batch once; on pp stages each op is 1/pp of it.
    per_op = compute / m / pp
    length = {"F": per_op * (1 - BACKWARD_SHARE), "B": per_op * BACKWARD_SHARE}
    orders = [schedule_order(schedule, pp, m, stage) for stage in range(pp)]
    done: dict[tuple[str, int, int], float] = {}
    free, position, blocks = [0.0] * pp, [0] * pp, []
    while any(position[s] < len(orders[s]) for s in range(pp)):
        for s in range(pp):
            while position[s] < len(orders[s]):
                kind, i, _ = orders[s][position[s]]
                deps = ([("F", i, s - 1)] if kind == "F" and s > 0 else []) + \
                       ([("F", i, s)] + ([("B", i, s + 1)] if s < pp - 1 else []) if kind == "B" else [])
                if any(d not in done for d in deps):
                    break
                start = max([free[s]] + [done[d] for d in deps])
                blocks.append(Block(s, kind, i, start, length[kind]))
                free[s] = done[(kind, i, s)] = start + length[kind]
                position[s] += 1
    blocks += [Block(s, "comm", -1, free[s], estimate.comm_time) for s in range(pp) if estimate.comm_time > 0]
    return blocks


def _param_layers(ir: IR) -> dict[str, tuple[str, int]]:
    """Parameter name -> (layer of the first node reading it, elements); tied weights once."""
    seen: dict[int, str] = {}
    out: dict[str, tuple[str, int]] = {}
    names = by_tensor(ir.gm)
    for node in ir.graph.nodes:
        if node.op == "call_module":
            params = list(ir.gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr" and node.target in names.values():
            params = [ir.gm.get_parameter(node.target)]
        else:
            continue
        for p in params:
            if id(p) not in seen:
                seen[id(p)] = names[id(p)]
                out[names[id(p)]] = (ir.meta(node).layer if ir.has_meta(node) else None, p.numel())
    return out


def _local_elements(ir: IR, plan: Plan, name: str, layer: str | None, numel: int) -> float:
    strategy = plan.strategy_for(layer) if layer else plan.default
    spec = ir.param_shardings.get(name)
    if spec is not None:
        numel /= spec.size
    return numel / strategy.dp if strategy.sdp else numel


def device_memory(plan: Plan, ir: IR | None = None, cluster: Cluster | None = None) -> list[DeviceMemory]:
    """Per-device memory parts; without an IR the whole predicted peak shows as activations."""
    estimate = plan.estimate
    if estimate is None:
        raise PcompileError("the plan has no estimate to draw memory from", "plot a plan made by pcompile.plan()")
    stage_of = {a.layer: a.stage for a in plan.layers}
    per_stage = [0.0] * plan.pp
    if ir is not None:
        for name, (layer, numel) in _param_layers(ir).items():
            per_stage[stage_of.get(layer, 0)] += _local_elements(ir, plan, name, layer, numel)
    devices_per_stage = plan.num_devices // plan.pp
    out = []
    for rank in range(plan.num_devices):
        elements = per_stage[rank // devices_per_stage]
        states = {k: elements * v for k, v in BYTES_PER_ELEMENT.items()}
        budget = cluster.device_of(rank).budget if cluster is not None else estimate.memory_budget
        out.append(DeviceMemory(rank, states["params"], states["grads"], states["optimizer"],
                                max(0.0, estimate.peak_memory - sum(states.values())), budget))
    return out


# -- text (the plan as `pcompile plan` prints it) ---------------------------------------------
def table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for h in headers:
            table.add_column(h)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    print(title)
    for row in [headers] + rows:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def human(value: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{' ' if unit else ''}{suffix}{unit}"
    return f"{value:.3g}{' ' if unit else ''}{unit}"


def human_bytes(value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def print_plan(plan, workload, cluster, flops: float) -> None:
    """The plan as `pcompile plan` prints it: strategies, predicted figures, candidates and the gain."""
    params = sum(p.numel() for p in workload.model.parameters())
    device = cluster.min_device()
    print(f"pcompile plan: {workload.name} ({human(params)} parameters), global batch {workload.tokens} "
          f"{workload.unit}, on {cluster.name} ({cluster.num_devices} x {device.name}, "
          f"{device.memory_bytes / 2**30:.1f} GiB each)")
    if plan.layers:
        table("per-layer strategies", ["layer", "strategy", "stage"],
              [[a.layer, a.strategy.describe(), str(a.stage)] for a in plan.layers])
    else:
        print(f"strategy: {plan.default.describe()} for every layer"
              + (f", pp{plan.pp} {plan.describe_schedule()}" if plan.pp > 1 else ""))
    e = plan.estimate
    if e is not None:
        print(f"predicted: step {e.step_time * 1e3:.2f} ms (compute {e.compute_time * 1e3:.2f} ms, communication "
              f"{e.comm_time * 1e3:.2f} ms), peak memory {human_bytes(e.peak_memory)} of "
              f"{human_bytes(e.memory_budget)} per device")
        print(f"           {human(workload.tokens / e.step_time)} {workload.unit}/s, "
              f"{human(flops / e.step_time / plan.num_devices, 'FLOP/s')} per device")
    if plan.reason:
        print(f"why: {plan.reason}")
    costed = [c for c in plan.candidates if c.estimate is not None]
    rows = [[c.strategy.describe(), f"{c.estimate.step_time * 1e3:.2f}" if c.estimate else "-",
             human(workload.tokens / c.estimate.step_time) if c.estimate else "-",
             human_bytes(c.estimate.peak_memory) if c.estimate else "-", c.verdict] for c in plan.candidates]
    if rows:
        table("candidates (baselines)", ["strategy", "step ms", f"{workload.unit}/s", "memory/device", "verdict"],
              rows)
    print(gain_line(plan, costed))


def gain_line(plan, costed) -> str:
    others = [c for c in costed if c.verdict not in ("chosen",) and not c.verdict.startswith("out of memory")]
    if plan.estimate is None or not others:
        return "gain: no other fitting strategy to compare with"
    best = min(others, key=lambda c: c.estimate.step_time)
    worst = max(others, key=lambda c: c.estimate.step_time)
    line = f"gain: {best.estimate.step_time / plan.estimate.step_time:.2f}x over the best other strategy " \
           f"({best.strategy.describe()})"
    if worst is not best:
        line += (f", {worst.estimate.step_time / plan.estimate.step_time:.2f}x over the worst "
                 f"({worst.strategy.describe()})")
    return line


# -- figures ---------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PcompileError("plots need matplotlib, which is not installed",
                            "pip install 'pcompile[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(plan: Plan, path: str) -> str:
    plt = _pyplot()
    blocks = schedule_blocks(plan)
    end = max(b.start + b.length for b in blocks)
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.6 * plan.pp))
    for s in range(plan.pp):
        ax.broken_barh([(0, end * 1e3)], (s - 0.4, 0.8), facecolors=COLORS["bubble"])
    for b in blocks:
        ax.broken_barh([(b.start * 1e3, b.length * 1e3)], (b.stage - 0.4, 0.8), facecolors=COLORS[b.kind],
                       edgecolor="white", linewidth=0.5)
        if b.kind != "comm" and plan.num_microbatches > 1 and b.length * 1e3 > end * 1e3 / 60:
            ax.text((b.start + b.length / 2) * 1e3, b.stage, str(b.microbatch), ha="center", va="center",
                    fontsize=7, color="white")
    ax.set_xlim(0, end * 1e3)
    ax.set_yticks(range(plan.pp), [f"stage {s}" for s in range(plan.pp)])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms, predicted)")
    label = f"{plan.default.describe()}" + (f" x pp{plan.pp}, {plan.describe_schedule()}"
                                            if plan.pp > 1 else " (no pipeline: one stage)")
    ax.set_title(f"Schedule per stage: {label}; equal stage costs assumed", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in ("F", "B", "comm", "bubble")]
    ax.legend(handles, ["forward", "backward", "gradient sync", "bubble / idle"], loc="upper left",
              bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    return _save(fig, plt, path)


def plot_memory(plan: Plan, path: str, ir: IR | None = None, cluster: Cluster | None = None) -> str:
    plt = _pyplot()
    devices = device_memory(plan, ir, cluster)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(devices) + 3.5), 4))
    ranks = [d.rank for d in devices]
    bottom = [0.0] * len(devices)
    parts = ("params", "grads", "optimizer", "activations") if ir is not None else ("activations",)
    for part in parts:
        values = [getattr(d, part) / GiB for d in devices]
        label = part if ir is not None else "predicted peak (no breakdown without the IR)"
        ax.bar(ranks, values, bottom=bottom, color=COLORS[part], label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    for d in devices:
        ax.hlines(d.budget / GiB, d.rank - 0.45, d.rank + 0.45, colors="black", linestyles="dashed")
    ax.plot([], [], "k--", label="budget")
    top = max(max(bottom), max(d.budget for d in devices) / GiB)
    ax.set_ylim(0, (top or 1.0) * 1.15)  # an all-zero plan (no estimate figures) still draws
    ax.set_xticks(ranks, [f"rank {r}" for r in ranks], rotation=45 if len(ranks) > 8 else 0, fontsize=8)
    ax.set_ylabel("GiB per device")
    ax.set_title(f"Memory per device: {plan.default.describe()}" + (f" x pp{plan.pp}" if plan.pp > 1 else ""),
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return _save(fig, plt, path)


def plot_gain(plan: Plan, path: str) -> str:
    plt = _pyplot()
    costed = [c for c in plan.candidates if c.estimate is not None]
    chosen = plan.estimate.step_time if plan.estimate else None
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(1, len(costed))))
    if not costed:
        ax.text(0.5, 0.5, "the plan holds no costed candidates (a forced plan?)", ha="center", va="center")
        ax.axis("off")
        return _save(fig, plt, path)
    labels, times, colors = [], [], []
    for c in costed:
        fits = not c.verdict.startswith("out of memory")
        labels.append(c.strategy.describe())
        times.append(c.estimate.step_time * 1e3)
        colors.append("#55A868" if c.verdict == "chosen" else ("#8C8C8C" if fits else "#C44E52"))
    bars = ax.barh(range(len(costed)), times, color=colors)
    for bar, c, t in zip(bars, costed, times):
        if c.verdict == "chosen":
            note = "chosen"
        elif c.verdict.startswith("out of memory"):
            note = "out of memory"
        else:
            note = f"chosen is {c.estimate.step_time / chosen:.2f}x faster" if chosen else c.verdict
        ax.text(t, bar.get_y() + bar.get_height() / 2, "  " + note, va="center", fontsize=8)
    ax.set_yticks(range(len(costed)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, max(times) * 1.45)
    ax.set_xlabel("predicted step time (ms)")
    ax.set_title("Search: chosen plan vs the other strategies it costed", fontsize=10)
    return _save(fig, plt, path)


def _save(fig, plt, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(plan: Plan, directory: str, ir: IR | None = None, cluster: Cluster | None = None) -> list[str]:
    """timeline.png, memory.png and gain.png in `directory`; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    return [plot_timeline(plan, os.path.join(directory, "timeline.png")),
            plot_memory(plan, os.path.join(directory, "memory.png"), ir, cluster),
            plot_gain(plan, os.path.join(directory, "gain.png"))]
