"""Backend for pipelined plans: this rank's stages on a (pp, dp, tp) DeviceMesh, run by
torch.distributed.pipelining schedules (GPipe, 1F1B, interleaved 1F1B).

Mesh: pp outermost, tp innermost (tp ranks contiguous), so global rank = (p dp + d) tp + t.
Each pp rank p runs the stages s with s mod pp = p (`passes/pipeline_split.py` cut them).
Inside a stage the (dp, tp) lowering of `backends/distributed.py` applies: rank 0's weights
are broadcast, split parameters keep this rank's tp shard, tp collectives are bound to the
stage's tp group and gradients are averaged over the dp group after the schedule ran.
ZeRO-3 (sdp) layers keep this rank's dp chunk of their parameters (of its tp shard); their
`sdp_gather` nodes are bound to the stage's dp group, so each micro-batch gathers them and
reduce-scatters (averages over dp) its gradient into the chunk's .grad, where the
micro-batches accumulate; those gradients skip the dp all-reduce. ZeRO-2 (zero2) layers keep
their parameters whole and this rank's dp chunk of each for the optimizer
(pcompile.runtime.zero2): their buckets are reduce-scattered as the last micro-batch's backward
completes them, and the chunks all-gathered into the parameters before the step's first forward.

Layers at other (dp, tp) groupings (passes/reshard.py) group their stage's ranks as the flat
backend groups all ranks: each degree-named / batch axis gets the groups of every stage
(layer_groups.add_stage_axes), so local rank i of every stage holds what rank i holds in the
flat layout of dp * tp ranks, and the activations a stage sends (rank i to rank i of the next)
are regrouped by the reading layer. Gradients are then summed per parameter over its layer's
dp group and divided by the loss layer's dp after the schedule (layer_groups.sync_grads, not
overlapped with backward); ZeRO-2 chunks are divided likewise; the loss is averaged over the
loss layer's dp group; the step's loss counts are summed over the first layer's.

Exactness. The schedule splits this rank's batch into n equal micro-batches; the last
stage's output is the loss of its micro-batch (a mean over it), so the global loss is the
mean of the n micro-batch losses: each micro-batch's backward starts from 1/n of its loss
(`LossRelay.loss_fn`), so the summed micro-batch gradients are the mean's: both equal the
serial model's on the whole batch (for a loss that is a mean over equally many elements per
micro-batch). A parameter tied between stages
on different pp ranks (GPT's embedding = LM head) gets each copy's partial gradient; their
sum over the owning ranks is the full gradient, after which the copies see the same update.
"""
from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from pcompile.backends import batch_norm as batch_norms
from pcompile.backends import expert_groups, layer_groups
from pcompile.backends.devices import follow_device
from pcompile.backends.groups import bind_axes, device_mesh
from pcompile.backends.loss_relay import LossRelay, pp_line_group
from pcompile.errors import PcompileError
from pcompile.ir import IR, PipelineSplit
from pcompile.plan import Plan
from pcompile.runtime import collectives, grad_sync, materialise, precision, rng, zero2
from pcompile.runtime.loss_counts import step_counts
from pcompile.runtime.shards import gather_shards, take_shards

AXES = ("pp", "dp", "tp")
SCHEDULES = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B}


def broadcast_coalesced(tensors: list[torch.Tensor], src_rank: int | None = None, group=None,
                        group_src: int | None = None) -> None:
    """Broadcast `tensors` in place with one collective per dtype (one per tensor costs ~1 ms each on gloo)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.broadcast(flat, src=src_rank, group=group, group_src=group_src)
        offset = 0
        for t in same:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _without_side_effects(stage: PipelineStage, relay: LossRelay) -> PipelineStage:
    """A stage whose metadata inference (torch's pipelining runs the stage once on uninitialised
    tensors of the micro-batch's shapes before the first step, forward then backward) leaves no
    trace: the module's buffers (batch norm's running statistics and batch count) and the random
    streams are put back as they were, and the loss it computes on the last stage is not a
    micro-batch's (relay.inferring). Without it the garbage inputs reach the running statistics
    and the step's loss (NaN)."""
    # torch 2.13's names, then older ones'
    for name in ("_forward_metadata_inference", "_backward_metadata_inference", "_shape_inference"):
        infer = getattr(stage, name, None)
        if infer is None:
            continue

        def restored(*args, _infer=infer, **kwargs):
            buffers = [(b, b.detach().clone()) for b in stage.submod.buffers()]
            with rng.untouched(), relay.inferring():
                try:
                    return _infer(*args, **kwargs)
                finally:
                    for buffer, value in buffers:  # through .data: the inference's own backward (run
                        buffer.data.copy_(value)  # next, on garbage anyway) must not see a version bump
        setattr(stage, name, restored)
    return stage


def _owners(split: PipelineSplit) -> dict[str, int]:
    """state_dict key (aliases included) -> the first stage holding it."""
    owners: dict[str, int] = {}
    for stage in split.stages:
        for name in stage.gm.state_dict():
            owners.setdefault(name, stage.index)
    return owners


class PipelineRuntime:
    """This rank's stages, its schedule, and the groups they use."""

    def __init__(self, ir: IR, plan: Plan, split: PipelineSplit, model: torch.nn.Module, device: torch.device,
                 uid: int, compute_dtype: torch.dtype | None = None):

        self.ir, self.plan, self.split, self._model, self.device = ir, plan, split, model, device
        self.pp, self.dp, self.tp = plan.pp, plan.default.dp, plan.default.tp
        batch_norms.check_micro_batches([ir.gm], plan)  # on the whole model: every rank refuses alike
        self.mesh = device_mesh(device.type, self.pp, self.dp, self.tp, AXES)
        self.groups = {axis: self.mesh.get_group(axis) for axis in AXES}
        self.coords = {axis: self.mesh.get_local_rank(axis) for axis in AXES}
        expert_groups.add_expert_axes(ir, self.groups, self.coords, self.pp)  # ep (and edp) groups of each stage
        # layers at other (dp, tp) groupings than the default (passes/reshard.py): their axes' groups in each stage
        self.layout = ir.mixed_layout
        mixed = layer_groups.add_stage_axes(ir, self.groups, self.coords, self.pp)
        keys = {axis: f"pcompile{uid}/{axis}" for axis in ("dp", "tp", expert_groups.AXIS, *mixed)
                if axis in self.groups}
        for axis, key in keys.items():
            collectives.bind_group(key, self.groups[axis])
        full, stage_gms = copy.deepcopy((ir.gm, [s.gm for s in split.stages]))  # one copy: ties stay shared
        self.materialised = not materialise.on_meta(full)  # a meta model's pieces get values from init/load_weights
        if self.materialised:
            with torch.no_grad():
                broadcast_coalesced([t.data for t in itertools.chain(full.parameters(), full.buffers())],
                                    src_rank=0)
        mine = [s for s in split.stages if s.rank == self.coords["pp"]]
        self.modules = [stage_gms[s.index] for s in mine]
        take_shards(self.modules, ir.param_shardings, self.coords)
        self.sdp_shardings = ir.sdp_shardings
        self.sdp_params = take_shards(self.modules, self.sdp_shardings, self.coords)
        # expert parallelism: this rank's experts only (backends/expert_groups.py)
        self.experts = expert_groups.hold_local(self.modules, ir, self.groups, self.coords)
        if self.materialised:  # this rank's stages only (their buffers live in their own containers)
            for module in self.modules:
                module.to(device)
        else:  # uninitialised pieces, ties kept; values come from init_weights / load_weights
            fresh = materialise.allocate(self.modules, device)
            self.sdp_params = {id(fresh[i]) for i in self.sdp_params}
        for module in self.modules:  # export captures: their device constants
            follow_device(module, device)
        batch_norms.bind(self.modules, plan, f"pcompile{uid}", mixed=self.layout is not None)  # the whole batch's
        self.masters = None  # under mixed precision: fp32 masters of this rank's shards (pcompile.runtime.precision)
        if compute_dtype is not None:
            self.masters = precision.MasterWeights(torch.nn.ModuleList(self.modules), compute_dtype)
            self.sdp_params = {id(self.masters.master(p)) for m in self.modules for p in m.parameters()
                               if id(p) in self.sdp_params}
        for module in self.modules:
            bind_axes(module, keys)
        self.owners = _owners(split)
        self.tie_groups = self._tie_groups()
        z2 = zero2.shardings(ir, plan)  # the optimizer's piece of each parameter over dp: ZeRO-3's and ZeRO-2's chunks
        self.sdp_shardings = {**self.sdp_shardings, **z2}
        self.zero2 = self._zero2(z2, plan.num_microbatches) if z2 else None
        # mixed groupings: each parameter summed over its own layer's dp group after the schedule (sync_grads)
        self._dp_sync = self._overlapped_dp(plan.num_microbatches) if self.dp > 1 and self.layout is None else None
        num_stages = len(split.stages)
        self.is_last = any(s.index == num_stages - 1 for s in mine)
        self.relay = LossRelay(plan.num_microbatches, pp_line_group(self.mesh.mesh, self.coords), self.is_last,
                               device)
        self.stages = [_without_side_effects(PipelineStage(m, s.index, num_stages, device, group=self.groups["pp"]),
                                             self.relay) for m, s in zip(self.modules, mine)]
        schedule = SCHEDULES[plan.schedule]
        target = self.stages if plan.schedule == "Interleaved1F1B" else self.stages[0]
        self.schedule = schedule(target, n_microbatches=plan.num_microbatches, loss_fn=self.relay.loss_fn,
                                 scale_grads=False)

    # -- groups ----------------------------------------------------------------------------
    def _tie_groups(self) -> list[tuple[str, dist.ProcessGroup | None]]:
        """For each tied parameter: the group of ranks (same dp, tp coords) whose stages hold a copy.
        Every rank creates every group (new_group is collective), in the same order."""
        ranks = self.mesh.mesh  # [pp, dp, tp] -> global rank
        by_holders: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        out = []
        for name in self.split.tied:
            holders = tuple(sorted({s.rank for s in self.split.stages
                                    if any(self.split.canonical.get(n, n) == name
                                           for n, _ in s.gm.named_parameters(remove_duplicate=False))}))
            if holders not in by_holders:
                by_holders[holders] = None
                for d, t in itertools.product(range(self.dp), range(self.tp)):
                    group = dist.new_group([int(ranks[p, d, t]) for p in holders])
                    if (d, t) == (self.coords["dp"], self.coords["tp"]) and self.coords["pp"] in holders:
                        by_holders[holders] = group
            out.append((name, by_holders[holders]))
        return out

    def _accumulations(self, microbatches: int) -> tuple[list[torch.nn.Parameter], dict[int, int]]:
        """This rank's parameters once each, and id -> gradient accumulations per step: one per
        micro-batch and stage of this rank holding it."""
        holders: dict[int, int] = {}
        params = {}
        for module in self.modules:
            for p in {id(p): p for p in module.parameters()}.values():
                holders[id(p)] = holders.get(id(p), 0) + 1
                params.setdefault(id(p), p)
        return list(params.values()), {key: count * microbatches for key, count in holders.items()}

    def _zero2(self, shardings: dict, microbatches: int) -> zero2.ShardedGradients:
        """ZeRO-2 for this rank's zero2 parameters (after the masters' hooks, like the dp sync)."""
        names = {id(p): name for module in self.modules for name, p in module.named_parameters(remove_duplicate=False)}
        params, expected = self._accumulations(microbatches)
        members = [(p, p if self.masters is None else self.masters.master(p), shardings[names[id(p)]])
                   for p in params if names[id(p)] in shardings]
        divisor = self.dp if self.layout is None else self.layout.loss_dp  # as layer_groups.sync_grads divides
        return zero2.ShardedGradients(members, self.groups, self.coords, divisor, expected)

    def _overlapped_dp(self, microbatches: int) -> grad_sync.OverlappedAllReduce:
        """dp averaging issued during the last micro-batch's backward, for what neither ZeRO shards."""
        params, expected = self._accumulations(microbatches)
        names = {id(p): name for module in self.modules for name, p in module.named_parameters(remove_duplicate=False)}
        experts = self.experts.names if self.experts is not None else set()
        pairs = []
        for p in params:
            holder = p if self.masters is None else self.masters.master(p)
            zero2_param = self.zero2 is not None and self.zero2.chunk(holder) is not holder
            if id(holder) not in self.sdp_params and not zero2_param and names[id(p)] not in experts:
                pairs.append((p, holder))
        dense = grad_sync.OverlappedAllReduce(pairs, self.groups["dp"], self.dp, expected)
        if self.experts is None:
            return dense
        # experts: summed over the ranks holding them after the last micro-batch, divided by dp
        return expert_groups.with_sync(dense, self.experts, [(names[id(p)], p, p if self.masters is None else
                                                              self.masters.master(p)) for p in params], self.dp)

    def process_groups(self) -> list[dist.ProcessGroup]:
        """Every group this rank created and belongs to: the mesh's axes, the tied weights' and
        the loss relay's."""
        return [g for g in [*self.groups.values(), *(group for _, group in self.tie_groups), self.relay.group]
                if g is not None]

    # -- parameters ------------------------------------------------------------------------
    def named_parameters(self):
        """This rank's parameters under the model's (deduplicated) names."""
        seen: set[int] = set()
        for module in self.modules:
            for name, p in module.named_parameters(remove_duplicate=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    p = p if self.masters is None else self.masters.master(p)
                    yield self.split.canonical.get(name, name), p if self.zero2 is None else self.zero2.chunk(p)

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    # -- training --------------------------------------------------------------------------
    def _schedule_inputs(self, local_inputs: tuple) -> tuple[int, dict]:
        """(this rank's batch size, the schedule's keyword inputs: the model's and the step's counts)."""
        n = self.plan.num_microbatches
        batch = local_inputs[0].shape[0]
        if batch % n:
            raise PcompileError(f"this rank's batch of {batch} does not split into {n} micro-batches",
                                f"use a global batch that is a multiple of dp x num_microbatches = {self.dp * n}")
        if len(local_inputs) != len(self.split.model_inputs):
            raise PcompileError(f"train_step got {len(local_inputs)} inputs, the model takes "
                                f"{list(self.split.model_inputs)}", "pass every input of forward, positionally")
        counts = step_counts(self.ir.loss_counts, local_inputs, self._batch_group())
        if self.zero2 is not None:  # the chunks the optimizer stepped -> the replicated parameters
            self.zero2.pull()
        if self.masters is not None:
            self.masters.pull()
            local_inputs = self.masters.cast_inputs(local_inputs)
        return batch, {**dict(zip(self.split.model_inputs, local_inputs)), **counts}

    def train_step(self, local_inputs: tuple, sync: bool = True) -> torch.Tensor:
        """The schedule's forward and backward of every micro-batch (the dp averaging issued as the
        last micro-batch's backward finishes each bucket); then, when `sync`, the tied weights' sums."""
        batch, kwargs = self._schedule_inputs(local_inputs)
        params = dict(self.named_parameters())
        if self._dp_sync is not None:
            self._dp_sync.begin(sync)
        if self.zero2 is not None:
            self.zero2.begin(sync)
        self.relay.begin()
        self.schedule.step(target=torch.zeros(batch, device=self.device), return_outputs=False,
                           **kwargs)  # under mixed precision: accumulated in the fp32 masters (precision.py)
        if self.zero2 is not None:  # its buckets reduce-scattered during the last micro-batch's backward
            self.zero2.finish()
        if sync:
            if self._dp_sync is not None:  # sdp chunks' gradients were reduce-scattered over dp in backward
                self._dp_sync.finish()
            if self.layout is not None:  # per-parameter dp groups of the stage, scaled by the loss layer's dp
                z2 = set(self.sdp_shardings) - set(self.ir.sdp_shardings)
                layer_groups.sync_grads(self.layout, ((n, p) for n, p in params.items() if n not in z2),
                                        self.ir.sdp_shardings, self.groups)
            self._sum_tied(params)  # a zero2 weight's chunks: the same piece on every pp rank holding it
        return self._global_loss()

    def eval_step(self, local_inputs: tuple) -> torch.Tensor:
        """The schedule's forward of every micro-batch (no backward): the global loss."""
        batch, kwargs = self._schedule_inputs(local_inputs)
        self.relay.begin()
        self.schedule.eval(target=torch.zeros(batch, device=self.device), return_outputs=False, **kwargs)
        return self._global_loss()

    def _sum_tied(self, params: dict) -> None:
        """A weight tied across stages on several pp ranks: the sum of its copies' gradients. The
        group holds the ranks of the same (dp, tp) coordinates, so under tp and ZeRO-3 / ZeRO-2 the
        same shard / chunk. Every holder joins, after the schedule (which every rank finishes): a
        copy that got no gradient contributes zeros (as autograd sums an unused read) - skipping it
        would leave the other holders waiting in the all-reduce."""
        for name, group in self.tie_groups:
            param = params.get(name)
            if group is None or param is None or not param.requires_grad:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=group)

    def _batch_group(self):
        """The ranks that split the batch (and hold its other parts), or None."""
        if self.layout is not None:
            return layer_groups.batch_group(self.layout, self.groups)
        return self.groups["dp"] if self.dp > 1 else None

    def _global_loss(self) -> torch.Tensor:
        """The mean of the micro-batch losses (the sum of their 1/n shares), from the last stage to
        every pp rank (local rank i of each stage gets that of the last stage: LossRelay, sent
        during the drain), over the loss layer's dp group (of each stage: the same parts)."""
        loss = self.relay.loss()
        if self.layout is not None:
            return layer_groups.global_loss(self.layout, loss, self.groups)
        if self.dp > 1:
            dist.all_reduce(loss, group=self.groups["dp"])
            loss /= self.dp
        return loss

    def replicas(self) -> dict[int, int]:
        """id of each local parameter -> how many ranks hold that same piece: dp x tp x the pp
        ranks whose stages hold the parameter (a tied weight: several), over its pieces (tp, ZeRO-3)."""
        holders: dict[str, set[int]] = {}
        for stage in self.split.stages:
            for name, _ in stage.gm.named_parameters(remove_duplicate=False):
                holders.setdefault(self.split.canonical.get(name, name), set()).add(stage.rank)
        out = {}
        for name, p in self.named_parameters():
            pieces = math.prod(s.size for s in (self.ir.param_shardings.get(name), self.sdp_shardings.get(name))
                               if s is not None)
            pieces *= self.experts.pieces(name) if self.experts is not None else 1
            out[id(p)] = self.dp * self.tp * len(holders[name]) // pieces
        return out

    # -- full views, collective over every rank ----------------------------------------------
    def _full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        if self.experts is not None and name in self.experts.owner:  # held by one rank of the stage's ep group
            return self.experts.full(name, local)
        zero3, tp = self.sdp_shardings.get(name), self.ir.param_shardings.get(name)
        local = gather_shards(local, zero3, self.groups[zero3.axis] if zero3 else None)  # dp, then tp
        return gather_shards(local, tp, self.groups[tp.axis] if tp else None)

    def _from_owners(self, items: list[tuple[str, torch.Tensor | None, torch.Tensor]]) -> list[torch.Tensor]:
        """Full tensors for (state_dict key, local tensor or None, tensor of the full shape) items:
        each is assembled (tp all-gather) on the pp rank of its first stage, then every owner
        broadcasts its items over the pp group in one collective per dtype."""
        out = []
        for name, local, like in items:
            owner = self.split.stages[self.owners[name]].rank
            mine = owner == self.coords["pp"]
            out.append(self._full(name, local).to(self.device, like.dtype) if mine else
                       torch.empty(like.shape, dtype=like.dtype, device=self.device))
        for pp_rank in range(self.pp):
            tensors = [t for (name, _, _), t in zip(items, out) if self.split.stages[self.owners[name]].rank == pp_rank]
            broadcast_coalesced(tensors, group=self.groups["pp"], group_src=pp_rank)
        return [t.cpu() for t in out]

    def _local_state(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for module in self.modules:
            state.update(module.state_dict(keep_vars=True))
        if self.masters is not None:
            state = {k: self.masters.master(v) for k, v in state.items()}
        return state if self.zero2 is None else {k: self.zero2.chunk(v) for k, v in state.items()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        local = self._local_state()
        model_state = self._model.state_dict()
        held = [(name, local.get(name), t) for name, t in model_state.items() if name in self.owners]
        full = dict(zip([name for name, _, _ in held], self._from_owners(held)))
        return {name: full[name] if name in full else t.detach().clone() for name, t in model_state.items()}

    def full_grads(self) -> dict[str, torch.Tensor | None]:
        local = self._local_state()
        named = list(self._model.named_parameters())
        keys = [self._holder(name) for name, _ in named]
        present = torch.tensor([float(key is not None and key in local and local[key].grad is not None
                                      and self.split.stages[self.owners[key]].rank == self.coords["pp"])
                                for key in keys], device=self.device)
        dist.all_reduce(present, group=self.groups["pp"])
        items = [(key, local[key].grad if key in local else None, p)
                 for key, (_, p), has in zip(keys, named, present.tolist()) if has]
        full = iter(self._from_owners(items))
        return {name: next(full) if has else None for (name, _), has in zip(named, present.tolist())}

    def _holder(self, canonical: str) -> str | None:
        """The state_dict key (the name itself or an alias) under which the first stage holds it."""
        keys = [k for k, c in self.split.canonical.items() if c == canonical and k in self.owners]
        return min(keys, key=lambda k: self.owners[k]) if keys else None
