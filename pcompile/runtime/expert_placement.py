"""FlexMoE's dynamic expert placement (issue #18): where the experts of one MoE layer live in an
ep group, and a planner that re-places and replicates them when the measured token load is
skewed. Pure Python (no torch, no torch.distributed): the runtime measures the loads
(pcompile.runtime.expert_parallel.Routing), this module decides, backends/expert_rebalance.py
moves the parameters and optimizer states.

A placement of E experts over R ranks (the ep coordinates) gives each expert e its holders
H_e (a non-empty set of ranks, m_e = |H_e| replicas); rank r's slots are the experts it holds,
at most C of them (its capacity, C >= E/R). The dispatch splits the rows an ep rank sends to a
replicated expert into m_e contiguous parts, one per holder in rank order, so with load L_e
(tokens routed to e, summed over the group) each replica receives L_e / m_e of them and

    load(r)    = sum over e with r in H_e of L_e / m_e
    imbalance  = max_r load(r) / mean_r load(r),    mean_r load(r) = T = (sum_e L_e) / R

(1.0 is perfect balance; the step waits for the busiest rank).

The planner (`propose`), when the current placement's imbalance exceeds `threshold`:
1. replica counts, D'Hondt's apportionment of the R*C slots: start from m_e = 1 and repeatedly
   give one more replica to the expert with the heaviest share L_e / m_e (ties: the lower e;
   m_e <= R, as a rank holds an expert once; experts without load never replicate), which keeps
   m_e about proportional to L_e. Every count vector of that sequence is a candidate;
2. assignment of a candidate, longest processing time first (Graham's LPT, within 4/3 of the
   optimal makespan for unconstrained bins): the m_e shares L_e / m_e of every expert,
   heaviest first (ties: lower expert first), each to the least loaded rank that has a free
   slot and does not hold e yet; among equally loaded ranks the one that holds e now (no
   move), then the lowest. More replicas are not always better (R ranks and R + 1 heavy shares
   put two on one rank), hence:
3. the candidate whose assignment has the lowest imbalance wins (ties: fewer replicas, so
   fewer gradient sums and slots); it is returned only if its imbalance is lower than the
   current placement's (a rebalancing moves parameters and optimizer states: it must pay).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertPlacement:
    """holders[e]: the ranks (ep coordinates, ascending) that hold expert e."""

    holders: tuple[tuple[int, ...], ...]
    ranks: int

    def __post_init__(self):
        for e, held in enumerate(self.holders):
            if not held or list(held) != sorted(set(held)) or held[0] < 0 or held[-1] >= self.ranks:
                raise ValueError(f"expert {e}: holders {held} are not distinct ascending ranks below {self.ranks}")

    @staticmethod
    def static(num_experts: int, ranks: int) -> "ExpertPlacement":
        """Expert parallelism's fixed placement: expert e on rank e // (E / R), one replica each."""
        per = num_experts // ranks
        return ExpertPlacement(tuple((e // per,) for e in range(num_experts)), ranks)

    @property
    def num_experts(self) -> int:
        return len(self.holders)

    def slots(self, rank: int) -> tuple[int, ...]:
        """The experts rank `rank` holds, ascending (its slot order in the dispatch)."""
        return tuple(e for e, held in enumerate(self.holders) if rank in held)

    @property
    def capacity(self) -> int:
        """The most experts any rank holds."""
        return max(len(self.slots(r)) for r in range(self.ranks))

    def rank_loads(self, loads) -> list[float]:
        """Tokens each rank computes: every expert's load split evenly over its replicas."""
        out = [0.0] * self.ranks
        for e, held in enumerate(self.holders):
            for r in held:
                out[r] += loads[e] / len(held)
        return out

    def imbalance(self, loads) -> float:
        """max / mean of the ranks' loads (1.0 when there is no load at all)."""
        per_rank = self.rank_loads(loads)
        mean = sum(per_rank) / self.ranks
        return max(per_rank) / mean if mean > 0 else 1.0

    def describe(self) -> str:
        return " ".join(f"r{r}:{list(self.slots(r))}" for r in range(self.ranks))


def replica_counts(loads, ranks: int, capacity: int):
    """Step 1 of the module docstring: every replica count vector of the D'Hondt sequence."""
    counts = [1] * len(loads)
    yield list(counts)
    for _ in range(ranks * capacity - len(loads)):
        grow = [e for e, m in enumerate(counts) if m < ranks and loads[e] > 0]
        if not grow:
            return
        e = min(grow, key=lambda e: (-loads[e] / counts[e], e))
        counts[e] += 1
        yield list(counts)


def assign(loads, counts: list[int], ranks: int, capacity: int, current: ExpertPlacement | None) -> ExpertPlacement:
    """Step 2: LPT of the shares L_e / m_e onto the ranks (module docstring)."""
    shares = sorted(((loads[e] / m, e) for e, m in enumerate(counts) for _ in range(m)), key=lambda s: (-s[0], s[1]))
    held: list[list[int]] = [[] for _ in range(len(loads))]
    rank_load, used = [0.0] * ranks, [0] * ranks
    for share, e in shares:
        free = [r for r in range(ranks) if used[r] < capacity and r not in held[e]]
        if not free:
            raise ValueError(f"no free slot for expert {e}: {ranks} ranks x {capacity} slots")
        stays = (lambda r: r not in current.holders[e]) if current is not None else (lambda r: False)
        r = min(free, key=lambda r: (rank_load[r], stays(r), r))
        held[e].append(r)
        rank_load[r] += share
        used[r] += 1
    return ExpertPlacement(tuple(tuple(sorted(h)) for h in held), ranks)


def propose(loads, current: ExpertPlacement, capacity: int, threshold: float = 1.25) -> ExpertPlacement | None:
    """A new placement of one layer's experts for the measured `loads` (tokens per expert), or
    None when the current one is balanced enough (imbalance <= threshold) or the planner finds
    none better. `capacity`: expert slots per rank (at least E / R)."""
    ranks, experts = current.ranks, current.num_experts
    if len(loads) != experts:
        raise ValueError(f"{len(loads)} loads for {experts} experts")
    if capacity * ranks < experts:
        raise ValueError(f"{ranks} ranks x {capacity} slots cannot hold {experts} experts")
    before = current.imbalance(loads)
    if before <= threshold:
        return None
    best = None
    for counts in replica_counts(loads, ranks, capacity):
        placement = assign(loads, counts, ranks, capacity, current)
        if best is None or placement.imbalance(loads) < best.imbalance(loads) - 1e-12:
            best = placement
    return best if best.imbalance(loads) < before else None
