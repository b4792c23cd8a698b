"""Expert parallelism at run time: a mixture of experts computed with its experts spread over
the `ep` ranks of an expert-parallel group (passes/expert_parallel.py inserts `expert_mixture`).

Rank r of the group computes experts r*E/ep .. (r+1)*E/ep - 1 (its local experts), or those
of its slots in the layer's `Routing` (FlexMoE's rebalancing, pcompile.runtime.expert_placement:
experts moved between ranks, hot ones replicated on several). Forward, dropless (every token
goes to each of its top-k experts):
  1. each (token, choice) pair is sorted by expert (a stable sort: a token's pairs stay in the
     order of its choices' experts), its token row copied; the rows of an expert with m
     replicas are cut into m contiguous parts (sizes differing by at most one, the first ones
     larger), part i for its i-th holder, and sorted (stably) by (holder rank, slot);
  2. the count of pairs per (rank, slot) is exchanged (an all-to-all of equal splits), so each
     rank knows how many rows it receives from each source, for each of its slots; the
     per-expert counts are added to the routing's measured loads (forward passes with
     gradients, not a checkpointed region's recomputation);
  3. the rows go to their experts' ranks with an all-to-all of variable split sizes
     (dist.all_to_all_single with input / output split sizes);
  4. each local expert runs on its rows (fc -> activation -> out);
  5. the results return by the reverse all-to-all, are multiplied by their gates and summed
     back into their tokens (index_add, in expert order per token).
`_AllToAll` is the autograd Function of step 3 and 5: its backward is the reverse all-to-all of
the gradient. Each rank's expert gradients are then the sum over its group's tokens of the
group's losses; backends/expert_groups.py sums them over the expert's replicas and divides by
dp, the serial gradient: see passes/expert_parallel.py. Only this rank's experts' parameters
hold values (the others are empty tensors at run time).

Without a process group (collectives.simulate(): the shape checks on fake tensors) the mixture
is computed densely from every expert (the values there do not matter, the shapes do).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pcompile.runtime import batch_norm, collectives, ops
from pcompile.runtime.expert_placement import ExpertPlacement

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class Routing:
    """One MoE layer's placement at run time (the same on every rank of the dp group) and the
    tokens this rank routed to each expert since the last `reset()` (a rebalancing)."""

    def __init__(self, placement: ExpertPlacement):
        self.loads = None  # int64 tensor [E], this rank's tokens per expert
        self.rows = 0  # rows this rank's experts computed (the load it carried), same forwards
        # expert tensor parallelism: whether this rank adds out's bias (tp coordinate 0 only: the
        # partial outputs are summed over tp after the mixture); set by backends/expert_groups.py
        self.adds_bias = True
        self.place(placement)

    def place(self, placement: ExpertPlacement) -> None:
        self.placement, self.capacity = placement, placement.capacity
        self.slots = [placement.slots(r) for r in range(placement.ranks)]
        # (rank, slot) of each part of each expert, as a flat index rank * capacity + slot
        self._keys = [[r * self.capacity + self.slots[r].index(e) for r in held]
                      for e, held in enumerate(placement.holders)]

    def record(self, counts: torch.Tensor, rows: int) -> None:
        # a checkpointed region's recomputation sees the same tokens again: counted once
        if torch.is_grad_enabled() and not batch_norm._RECOMPUTING[0]:
            self.loads = counts.detach().clone() if self.loads is None else self.loads + counts
            self.rows += rows

    def reset(self) -> None:
        self.loads, self.rows = None, 0

    def parts(self, counts: list[int]) -> tuple[list[int], list[int]]:
        """(rank * capacity + slot, rows) of every part of every expert, in expert order: an
        expert's `counts[e]` sorted rows cut into contiguous parts over its holders."""
        keys, sizes = [], []
        for e, count in enumerate(counts):
            whole, extra = divmod(count, len(self._keys[e]))
            for i, key in enumerate(self._keys[e]):
                keys.append(key)
                sizes.append(whole + (i < extra))
        return keys, sizes


_ROUTES: dict[str, Routing] = {}  # bound by backends/expert_groups.py into the lowered graphs' mixtures


def bind_routing(key: str, routing: Routing) -> None:
    _ROUTES[key] = routing


def unbind_routing(key: str) -> None:
    _ROUTES.pop(key, None)


def _routing(route: str | None, size: int, num_experts: int) -> Routing:
    if route is not None:
        return _ROUTES[route]
    return Routing(ExpertPlacement.static(num_experts, size))  # a graph run outside a lowering: fixed placement


class _AllToAll(torch.autograd.Function):
    """Rows of `x` sent to the group's ranks in blocks of `send` rows, `recv` rows received from
    each; backward sends the gradient back the same way reversed."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def _expert(x: torch.Tensor, activation: str, params: tuple) -> torch.Tensor:
    fc_w, fc_b, out_w, out_b = params
    return F.linear(ACTIVATIONS[activation](F.linear(x, fc_w, fc_b)), out_w, out_b)


def _per_expert(params: tuple, num_experts: int, has_bias: bool) -> list[tuple]:
    """(fc.weight, fc.bias, out.weight, out.bias) of every expert from the flat argument list."""
    step = 4 if has_bias else 2
    if len(params) != step * num_experts:
        raise RuntimeError(f"pcompile: expert_mixture got {len(params)} parameters for {num_experts} experts")
    out = []
    for e in range(num_experts):
        chunk = params[e * step:(e + 1) * step]
        out.append(tuple(chunk) if has_bias else (chunk[0], None, chunk[1], None))
    return out


def _dense(x, indices, gates, activation, experts):
    weights = torch.zeros(x.shape[0], len(experts), dtype=x.dtype, device=x.device).scatter(-1, indices, gates)
    out = torch.zeros_like(x)
    for e, params in enumerate(experts):
        out = out + weights[:, e:e + 1] * _expert(x, activation, params)
    return out


@ops.collective(axis_arg=4)
def expert_mixture(tokens: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, activation: str, axis: str,
                   size: int, num_experts: int, has_bias: bool, *params: torch.Tensor,
                   route: str | None = None, tp_split: bool = False) -> torch.Tensor:
    """The dropless top-k mixture sum_j gates[t, j] * expert_{indices[t, j]}(tokens[t]) of every
    token, with the experts spread over the `size` ranks of `axis` (module docstring). `params`:
    every expert's fc.weight, fc.bias, out.weight, out.bias in expert order (biases left out
    when `has_bias` is False); only this rank's experts' are read. `route`: the key of the
    layer's Routing (the static placement without one). `tp_split` (expert tensor parallelism,
    passes/expert_parallel.py): the params are this tp rank's slices, the result a partial sum
    over tp, out's bias added where the routing says (tp coordinate 0)."""
    experts = _per_expert(params, num_experts, has_bias)
    group = collectives._group(axis)
    if group is None:
        k, width = indices.shape[-1], tokens.shape[-1]
        dense = _dense(tokens.reshape(-1, width), indices.reshape(-1, k), gates.reshape(-1, k), activation, experts)
        return dense.view(tokens.shape)
    routing = _routing(route, size, num_experts)
    if tp_split and has_bias and not routing.adds_bias:
        experts = [(fc_w, fc_b, out_w, None) for fc_w, fc_b, out_w, _ in experts]
    return _dispatch(tokens, indices, gates, group, routing, tokens.shape[-1],
                     lambda slot, e, rows: _expert(rows, activation, experts[e]))


def _gated_expert(x: torch.Tensor, activation: str, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Hugging Face's expert: act(x W_gate^T) * (x W_up^T), then W_down (gate_up holds W_gate, W_up)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(ACTIVATIONS[activation](gate) * up, down)


@ops.collective(axis_arg=4)
def gated_expert_mixture(tokens: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, activation: str, axis: str,
                         size: int, num_experts: int, gate_up: torch.Tensor, down: torch.Tensor,
                         route: str | None = None) -> torch.Tensor:
    """expert_mixture for batched expert weights (Hugging Face Mixtral / Qwen-MoE): `gate_up`
    (n, 2I, H) and `down` (n, H, I) hold the stacked rows of this rank's n experts, row j the
    routing's slot j (its j-th held expert, ascending): under the static placement the chunk
    r*E/size .. of the stacked weights, after a rebalancing whichever experts the placement
    gives the rank (backends/expert_groups.py re-stacks them)."""
    group = collectives._group(axis)
    if group is None:  # the local experts only, densely (shapes)
        k, width = indices.shape[-1], tokens.shape[-1]
        x, chosen = tokens.reshape(-1, width), indices.reshape(-1, k) % gate_up.shape[0]
        experts = [(gate_up[e], down[e]) for e in range(gate_up.shape[0])]
        weights = torch.zeros(x.shape[0], len(experts), dtype=x.dtype, device=x.device).scatter(
            -1, chosen, gates.reshape(-1, k).to(x.dtype))
        out = torch.zeros_like(x)
        for e, (w1, w2) in enumerate(experts):
            out = out + weights[:, e:e + 1] * _gated_expert(x, activation, w1, w2)
        return out.view(tokens.shape)
    return _dispatch(tokens, indices, gates, group, _routing(route, size, num_experts), down.shape[1],
                     lambda slot, e, rows: _gated_expert(rows, activation, gate_up[slot], down[slot]))


def _dispatch(tokens, indices, gates, group, routing: Routing, out_width: int, compute) -> torch.Tensor:
    """Steps 1-5 of the module docstring; `compute(slot, e, rows)`: expert e (this rank's slot
    `slot`) on its rows."""
    shape, width = tokens.shape, tokens.shape[-1]
    k, size, capacity = indices.shape[-1], routing.placement.ranks, routing.capacity
    x, chosen, gate = tokens.reshape(-1, width), indices.reshape(-1, k), gates.reshape(-1, k)
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=routing.placement.num_experts)
    keys, sizes = routing.parts(counts.tolist())
    # each sorted pair's (rank, slot); pairs re-sorted by it, stably (an expert's parts in order)
    key = torch.repeat_interleave(torch.tensor(keys, device=x.device), torch.tensor(sizes, device=x.device))
    order = order[torch.argsort(key, stable=True)]
    token_of = torch.div(order, k, rounding_mode="floor")
    sent_counts = torch.bincount(key, minlength=size * capacity)
    received_counts = torch.empty_like(sent_counts)  # [source rank, slot]
    dist.all_to_all_single(received_counts, sent_counts, group=group)
    send = sent_counts.view(size, capacity).sum(1).tolist()
    received_counts = received_counts.view(size, capacity)
    recv = received_counts.sum(1).tolist()
    routing.record(counts, sum(recv))
    rows = _AllToAll.apply(x[token_of], send, recv, group)
    slot = torch.arange(capacity, device=x.device).repeat(size).repeat_interleave(received_counts.reshape(-1))
    computed = rows.new_zeros((rows.shape[0], out_width))
    for j, e in enumerate(routing.slots[dist.get_rank(group)]):
        at = (slot == j).nonzero().squeeze(1)
        if at.numel():
            computed = computed.index_add(0, at, compute(j, e, rows[at]))
    if rows.requires_grad and not computed.requires_grad:
        # no rows for this rank's experts: still one backward all-to-all per forward one on every
        # rank of the group (collectives must match), with a zero gradient
        computed = computed + 0 * rows.sum()
    back = _AllToAll.apply(computed, recv, send, group)
    weighted = back * gate.reshape(-1)[order].unsqueeze(1).to(back.dtype)
    return torch.zeros_like(x).index_add(0, token_of, weighted).view(shape)
