"""FlexMoE's load rebalancing for a compiled model with expert parallelism (issue #18): what
`cm.expert_loads()` and `cm.rebalance(optimizer)` do.

Loads: every expert mixture adds the tokens this rank routed to each expert to its layer's
Routing (pcompile.runtime.expert_parallel) on every training forward; `loads` sums them over
the data-parallel group (every ep group: they share one placement), since the last rebalancing.

Rebalancing, between steps (after optimizer.step() and zero_grad()), collective: the loads
are summed as above (the same on every rank), the planner (pcompile.runtime.expert_placement)
proposes a placement per layer, the same on every rank, and the storage
(backends/expert_groups.py ExpertStorage.move) broadcasts each expert gaining holders, with its
optimizer state, from its first holder inside every ep group (batched expert weights, HF
Mixtral's: its rows of the stacked tensors and of their moments, each rank's tensors then
re-stacked with one row per expert it holds). Numerics do not change: every
token still meets the same expert weights (a replica computes part of its rows), and a
replicated expert's gradient is summed over all its holders before the division by dp, so
each replica steps the same gradient from the same moments (the serial update).

Under expert tensor parallelism (etp) every tp coordinate's ep group moves its slices of the
experts alike. Refused with a PcompileError: plans without ep, pipelined plans, mixed precision (the bf16
copies and fp32 masters would both need moving), per-layer (dp, tp) layouts, gradients not
cleared, an optimizer with expert state not passed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pcompile.errors import PcompileError
from pcompile.runtime import optimizers
from pcompile.runtime.expert_placement import ExpertPlacement, propose


def _storage(cm, what: str):
    if cm.experts is None:
        raise PcompileError(f"{what} needs expert parallelism, and this plan has none (ep=1 everywhere)",
                            "plan the MoE layers with ep > 1 (e.g. Plan.uniform(dp=4, ep=4)), or drop the rebalancing")
    return cm.experts


def _summed(cm, storage, extra: list[float] = ()) -> tuple[dict[str, list[int]], list[float]]:
    """Each layer's loads (and `extra` numbers) summed over the data-parallel group."""
    device = storage._named[0][1].device if storage._named else torch.device("cpu")
    parts = [storage.routes[layer.name].loads for layer in storage.layers]
    flat = torch.cat([torch.zeros(layer.num_experts, dtype=torch.float64, device=device) if part is None
                      else part.to(torch.float64) for layer, part in zip(storage.layers, parts)]
                     + [torch.tensor(list(extra), dtype=torch.float64, device=device)])
    group = cm.groups.get("dp")
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    values, out, offset = flat.tolist(), {}, 0
    for layer in storage.layers:
        out[layer.name] = [int(v) for v in values[offset:offset + layer.num_experts]]
        offset += layer.num_experts
    return out, values[offset:]


def loads(cm) -> dict[str, list[int]]:
    """Collective over the dp group: tokens routed to each expert, per MoE layer (its module
    path), summed over the dp group's ranks since the last rebalancing."""
    storage = _storage(cm, "expert_loads()")
    if cm.plan.pp > 1:  # the counts would include torch's metadata inference on placeholder tensors
        raise PcompileError("expert_loads() of a pipelined plan is not supported yet (torch's pipelining runs each "
                            "stage once on placeholder tensors before the first step, which the counts would include)",
                            "measure the loads under a plan with pp=1")
    return _summed(cm, storage)[0]


def check_plan(plan, every: int) -> None:
    """Refuse rebalancing every `every` steps under a plan that cannot rebalance (before any
    rank starts): no ep anywhere, or a pipeline."""
    if every < 0:
        raise PcompileError(f"rebalancing every {every} steps", "give a positive number of steps (0: off)")
    if not every:
        return
    if max([plan.default.ep] + [assignment.strategy.ep for assignment in plan.layers]) <= 1:
        raise PcompileError("expert rebalancing needs expert parallelism, and this plan has none (ep=1 everywhere)",
                            "plan the MoE layers with ep > 1 (e.g. Plan.uniform(dp=4, ep=4)), or drop the rebalancing")
    if plan.pp > 1:
        raise PcompileError("expert rebalancing of a pipelined plan is not supported yet",
                            "train without rebalancing (the static placement is exact too), or use pp=1")



def check(cm) -> None:
    """Refuse rebalancing on this compiled model now rather than after the first steps."""
    _refuse_unsupported(cm, _storage(cm, "rebalancing"))


def _refuse_unsupported(cm, storage) -> None:
    fix = "train without rebalancing (the static placement is exact too)"
    if cm.plan.pp > 1:
        raise PcompileError("expert rebalancing of a pipelined plan is not supported yet", fix + ", or use pp=1")
    if cm.masters is not None:
        raise PcompileError("expert rebalancing under mixed precision is not supported yet", fix + ", or use fp32")
    if cm.layout is not None:
        raise PcompileError("expert rebalancing with per-layer (dp, tp) groupings is not supported yet",
                            fix + ", or give every layer the same dp and tp")


def _states(optimizer, storage, leaves: list) -> dict[int, dict]:
    """id(leaf) -> the optimizer's state tensors of that parameter's shape (moved with it)."""
    held = {id(leaf) for leaf in leaves}
    others = [o for o in optimizers.stepped() if o is not optimizer
              and any(id(p) in held and o.state.get(p) for g in o.param_groups for p in g["params"])]
    if others:
        raise PcompileError(f"an optimizer ({type(others[0]).__name__}) holds state for the experts but was not passed "
                            "to rebalance: its moments would stay behind", "call cm.rebalance(optimizer)")
    out = {}
    for leaf in leaves:
        state = optimizer.state.get(leaf, {}) if optimizer is not None else {}
        # moments have the parameter's shape (empty where the expert is held elsewhere); step counts are scalars
        tensors = {k: v for k, v in sorted(state.items()) if torch.is_tensor(v) and v.dim() > 0}
        if any(v.dtype != leaf.dtype for v in tensors.values()):
            raise PcompileError(f"{type(optimizer).__name__}'s state is not in the parameters' dtype {leaf.dtype}",
                                "use an optimizer whose moments have the parameters' dtype (AdamW, Adam, SGD)")
        out[id(leaf)] = tensors
    return out


def rebalance(cm, optimizer=None, threshold: float = 1.25, capacity: int | None = None,
              placements: dict[str, ExpertPlacement] | None = None) -> dict[str, ExpertPlacement]:
    """Collective (module docstring): re-place the experts of every MoE layer whose imbalance
    (max rank load / mean) exceeds `threshold`, with at most `capacity` experts per rank
    (default E/ep + 1: one spare slot for a replica); `placements` (layer -> ExpertPlacement)
    forces them instead. Returns the placements applied (the loads measured are reset)."""
    storage = _storage(cm, "rebalance()")
    _refuse_unsupported(cm, storage)
    expert_names = {name for layer in storage.layers for name in layer.params}
    pending = [leaf for name, leaf, holder in storage._named if name in expert_names
               for g in (leaf.grad, holder.grad) if g is not None and bool(g.ne(0).any())]
    measured, (dirty,) = _summed(cm, storage, [float(len(pending))])
    if dirty:
        raise PcompileError("rebalance() with gradients pending: they were computed under the old placement",
                            "call it between steps, after optimizer.step() and optimizer.zero_grad()")
    chosen = {}
    for layer in storage.layers:
        current = storage.routes[layer.name].placement
        if placements is not None:
            new = placements.get(layer.name)
            if new is not None and (new.ranks != storage.ep or new.num_experts != layer.num_experts):
                raise PcompileError(f"placement for {layer.name} has {new.ranks} ranks and {new.num_experts} experts, "
                                    f"the layer {storage.ep} and {layer.num_experts}", "give one over its ep group")
        else:
            slots = capacity if capacity is not None else layer.num_experts // storage.ep + 1
            new = propose(measured[layer.name], current, slots, threshold)
        if new is not None and new != current:
            chosen[layer.name] = new
    leaves = [leaf for name, leaf, _ in storage._named if name in expert_names]
    states = _states(optimizer, storage, leaves) if chosen else {}
    if chosen and storage.group is not None:  # every rank must move the same state tensors
        keys = sorted({k for tensors in states.values() for k in tensors})
        seen = [None] * dist.get_world_size(storage.group)
        dist.all_gather_object(seen, keys, group=storage.group)
        if any(other != keys for other in seen):
            raise PcompileError("the ranks' optimizer states for the experts differ (some ranks never stepped them)",
                                "rebalance after the same optimizer steps on every rank")
    for layer in storage.layers:
        if layer.name in chosen:
            for leaf in leaves:
                leaf.grad = None
            storage.move(layer, chosen[layer.name], lambda leaf: states[id(leaf)])
        storage.routes[layer.name].reset()
    return chosen
