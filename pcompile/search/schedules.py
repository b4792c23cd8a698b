"""Pipeline-level estimate: step time and per-stage peak memory of GPipe, 1F1B and interleaved
1F1B, by simulating each schedule's op order rather than by a closed form.

Each stage runs its ordered list of forward (F) and backward (B) ops of (micro-batch, chunk);
an op starts when its stage is free and its inputs have arrived: F(v, i) needs F(v-1, i) plus
the p2p send from virtual stage v-1; B(v, i) needs B(v+1, i) plus the send back (and F(v, i)).
A stage's step ends with its gradient sync after its last op; the step is the slowest stage.
With equal stages and free sends this gives the textbook bubbles: GPipe and 1F1B take
(m + pp - 1)(f + b), interleaved 1F1B with v chunks m (f + b) + (pp - 1)(f + b) / v.

Memory: a stage holds one micro-batch's activations (per chunk) from its F to its B, so the
peak in flight follows from the order alone: GPipe m, 1F1B min(pp - stage, m), interleaved as
in Megatron (warm-up of 2 (pp - stage - 1) + (v - 1) pp chunk forwards, then one more).
"""
from __future__ import annotations

from dataclasses import dataclass

from pcompile.errors import PcompileError

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")


@dataclass(frozen=True)
class StageCost:
    """One stage's costs (all its layers; with v chunks, the sum over its chunks)."""

    fwd: float  # seconds per micro-batch
    bwd: float
    sync: float = 0.0  # per-step gradient communication left after the last backward
    send: float = 0.0  # p2p time of the activation it sends on (and of the gradient coming back)
    state_memory: float = 0.0  # bytes: params + grads + optimizer states
    activation_memory: float = 0.0  # bytes per in-flight micro-batch (all chunks)
    temp_memory: float = 0.0


@dataclass(frozen=True)
class PipelineEstimate:
    step_time: float
    stage_end: tuple[float, ...]  # when each stage finished (sync included)
    in_flight: tuple[float, ...]  # peak micro-batches of activations held per stage (chunk-weighted)
    peak_memory: tuple[float, ...]  # bytes per device of each stage

    @property
    def bubble_fraction(self) -> float:
        return 0.0 if not self.step_time else 1.0 - max(self.busy) / self.step_time

    busy: tuple[float, ...] = ()


def schedule_order(schedule: str, pp: int, m: int, stage: int, chunks: int = 1) -> list[tuple[str, int, int]]:
    """The ops of `stage` in the order it runs them: ("F" | "B", micro-batch, chunk)."""
    if schedule == "GPipe":
        return [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]
    if schedule == "1F1B":
        warm = min(pp - stage - 1, m)
        order = [("F", i, 0) for i in range(warm)]
        for i in range(m - warm):
            order += [("F", warm + i, 0), ("B", i, 0)]
        return order + [("B", i, 0) for i in range(m - warm, m)]
    if schedule == "Interleaved1F1B":
        if m % pp:
            raise PcompileError(f"interleaved 1F1B needs the micro-batch count ({m}) to be a multiple of pp={pp}",
                                f"use {pp * max(1, round(m / pp))} micro-batches or the 1F1B schedule")
        total = m * chunks

        def op(kind, k):
            chunk = (k // pp) % chunks
            return kind, (k // (pp * chunks)) * pp + k % pp, chunks - 1 - chunk if kind == "B" else chunk

        warm = min((pp - stage - 1) * 2 + (chunks - 1) * pp, total)
        order = [op("F", k) for k in range(warm)]
        for j in range(total - warm):
            order += [op("F", warm + j), op("B", j)]
        return order + [op("B", k) for k in range(total - warm, total)]
    raise PcompileError(f"unknown pipeline schedule {schedule!r}", f"use one of {SCHEDULES}")


def simulate(schedule: str, stages: list[StageCost], m: int, chunks: int = 1) -> PipelineEstimate:
    """Run the schedule's op orders against their dependencies; see the module docstring."""
    pp = len(stages)
    if schedule != "Interleaved1F1B":
        chunks = 1
    orders = [schedule_order(schedule, pp, m, s, chunks) for s in range(pp)]
    last_v = pp * chunks - 1
    done: dict[tuple[str, int, int], float] = {}  # (kind, micro-batch, virtual stage) -> finish time
    free = [0.0] * pp
    busy = [0.0] * pp
    position = [0] * pp
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(pp):
            while position[s] < len(orders[s]):
                kind, i, c = orders[s][position[s]]
                v = c * pp + s
                deps = []
                if kind == "F" and v > 0:
                    deps.append(("F", i, v - 1, stages[(v - 1) % pp].send))
                if kind == "B":
                    deps.append(("F", i, v, 0.0))
                    if v < last_v:
                        deps.append(("B", i, v + 1, stages[s].send))
                if any((d[0], d[1], d[2]) not in done for d in deps):
                    break
                start = max([free[s]] + [done[(d[0], d[1], d[2])] + d[3] for d in deps])
                length = (stages[s].fwd if kind == "F" else stages[s].bwd) / chunks
                free[s] = start + length
                busy[s] += length
                done[(kind, i, v)] = free[s]
                position[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise AssertionError(f"pipeline schedule {schedule} deadlocks (pp={pp}, m={m}, chunks={chunks})")
    ends = tuple(free[s] + stages[s].sync for s in range(pp))
    in_flight = tuple(peak_in_flight(orders[s], chunks) for s in range(pp))
    peaks = tuple(st.state_memory + st.activation_memory * f + st.temp_memory for st, f in zip(stages, in_flight))
    return PipelineEstimate(max(ends), ends, in_flight, peaks, tuple(busy))


def peak_in_flight(order: list[tuple[str, int, int]], chunks: int = 1) -> float:
    """Most micro-batches' activations held at once (a chunk's forward holds 1/chunks of one)."""
    held = peak = 0
    for kind, _, _ in order:
        held += 1 if kind == "F" else -1
        peak = max(peak, held)
    return peak / chunks


def backward_peak(memories, in_flight: float = 1.0, accumulating: bool = False, foreach: bool = True) -> float:
    """Peak bytes of one stage over a step, layer by layer through backward (layers in order).

    Parameters and optimizer states live throughout; all in-flight activations are held when
    backward starts; walking backward, layer l's gradients appear while its activations (and
    earlier layers') are still held, plus its transient. With gradient accumulation
    (`accumulating`, m > 1) every gradient is alive from the first micro-batch on. The
    optimizer step then holds states, gradients and its transient: every layer's `step_temp`
    at once when it runs `foreach`, else one layer's (the largest) at a time."""
    memories = list(memories)
    if not memories:
        return 0.0
    state = sum(x.params + x.optimizer for x in memories)
    grads_all = sum(x.grads for x in memories)
    peak, grads, held = 0.0, grads_all if accumulating else 0.0, sum(x.activations for x in memories) * in_flight
    for x in reversed(memories):
        if not accumulating:
            grads += x.grads
        peak = max(peak, state + grads + held + x.temp)
        held -= x.activations * in_flight
    step = sum(x.step_temp for x in memories) if foreach else max(x.step_temp for x in memories)
    return max(peak, state + grads_all + step)
