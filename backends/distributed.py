"""Backend: lower the rewritten IR to this rank's module on torch.distributed process groups.

The IR is rank-generic (SPMD): collectives name mesh axes ("tp", "dp") and parameters carry
a ParamSharding. Lowering (1) builds the (dp, tp) DeviceMesh, (2) copies the graph module,
broadcasts rank 0's weights and keeps this rank's shard of each split parameter, (3) binds
the axis names in the collective nodes to this mesh's process groups. Data parallelism
averages gradients over the dp group after backward. Plans with pp > 1 are lowered by
`backends/pipeline.py` on a (pp, dp, tp) mesh from the stages `pipeline_split` cut.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os

import torch
import torch.distributed as dist

from pcompile import checkpoint
from pcompile.backends import batch_norm as batch_norms
from pcompile.backends import devices, expert_groups, expert_rebalance, layer_groups, random_streams
from pcompile.backends.groups import bind_axes, device_mesh
from pcompile.backends.pipeline import PipelineRuntime
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.launch import rank_device
from pcompile.plan import Plan
from pcompile.runtime import (
    collectives,
    grad_norm,
    grad_sync,
    materialise,
    modes,
    ops,
    optimizers,
    precision,
    rng,
    zero2,
)
from pcompile.runtime.loss_counts import issue_step_counts, step_counts
from pcompile.runtime.shards import gather_shards, take_shards

_COMPILE_IDS = itertools.count()
AXES = ("dp", "tp")


class CompiledModel:
    """This rank's part of the parallel program (or the plan alone when no ranks run)."""

    def __init__(self, ir: IR, plan: Plan, model: torch.nn.Module, report: list[str],
                 mixed_precision: str | None = None, offload_optimizer: bool = False):
        self.ir, self.plan, self.report = ir, plan, report
        self._model = model
        self.compute_dtype = precision.compute_dtype(mixed_precision)
        self.offload_optimizer = offload_optimizer
        # precision.MasterWeights under mixed precision or an offloaded optimizer (the optimizer's parameters)
        self.masters = None
        self._lowered = False
        self._pipeline = None  # backends.pipeline.PipelineRuntime when plan.pp > 1
        self._dp_sync = None  # runtime.grad_sync.OverlappedAllReduce of a plain dp plan
        self.experts = None  # backends.expert_groups.ExpertStorage under expert parallelism
        self.zero2 = None  # runtime.zero2.ShardedGradients of the zero2 layers' parameters
        self.training = True
        self._sync = True  # False inside no_sync()
        self._grads = "clean"  # what .grad holds: "clean" (none), "pending" (unsynced sums), "synced"

    # -- lowering --------------------------------------------------------------------------
    def lower(self) -> "CompiledModel":
        plan = self.plan
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != plan.num_devices:
            raise PcompileError(
                f"the plan needs {plan.num_devices} ranks but {world} are running",
                f"launch with torchrun --nproc-per-node {plan.num_devices} or pcompile.launch(fn, "
                f"{plan.num_devices}), or plan for Cluster.local({world})")
        self.dp, self.tp = plan.default.dp, plan.default.tp
        self.layout = self.ir.mixed_layout  # per-layer (dp, tp) groupings, or None
        self.device = rank_device()
        if plan.pp > 1:
            return self._lower_pipeline()
        gm = copy.deepcopy(self.ir.gm)
        self.materialised = not materialise.on_meta(gm)  # a meta model: values from init/load_weights
        if self.materialised:
            gm.to(self.device)
        uid = next(_COMPILE_IDS)
        if world > 1:
            mesh = device_mesh(self.device.type, 1, self.dp, self.tp, AXES)
            self.groups = {axis: mesh.get_group(axis) for axis in AXES}
            self.coords = {axis: mesh.get_local_rank(axis) for axis in AXES}
            layer_groups.add_axes(self.ir, self.groups, self.coords)  # layers at other (dp, tp) groupings
            keys = {axis: f"pcompile{uid}/{axis}" for axis in self.groups}
            for axis in self.groups:
                collectives.bind_group(keys[axis], self.groups[axis])
            for tensor in itertools.chain(gm.parameters(), gm.buffers()) if self.materialised else ():
                dist.broadcast(tensor.data, src=0)
            bind_axes(gm, keys)
        else:
            self.groups, self.coords = {}, {axis: 0 for axis in AXES}
        take_shards([gm], self.ir.param_shardings, self.coords)  # tied weights stay one parameter
        # ZeRO-3: this rank's dp chunk of each sdp parameter, taken from its tp shard
        take_shards([gm], self.ir.sdp_shardings, self.coords)
        # how the optimizer's piece of each parameter is cut over dp: ZeRO-3's chunks, ZeRO-2's
        # (the module keeps a zero2 parameter whole; the optimizer steps its chunk)
        z2 = zero2.shardings(self.ir, plan) if world > 1 else {}
        self.sdp_shardings = {**self.ir.sdp_shardings, **z2}
        # expert parallelism: this rank's experts only (backends/expert_groups.py)
        self.experts = expert_groups.hold_local(gm, self.ir, self.groups, self.coords) if world > 1 else None
        if not self.materialised:  # this rank's pieces only, without values yet
            materialise.allocate([gm], self.device)
        if self.compute_dtype is not None or self.offload_optimizer:  # after sharding: this rank's shards
            self.masters = precision.MasterWeights(gm, self.compute_dtype or torch.float32,
                                                   offload=self.offload_optimizer)
        devices.follow_device(gm, self.device)  # export captures: their device constants
        batch_norms.bind([gm], plan, f"pcompile{uid}", mixed=self.layout is not None)  # the whole batch's statistics
        self._dp_sync = None  # dp averaging overlapped with backward (after the masters' hooks)
        if world > 1 and self.dp > 1 and self.layout is None:
            experts = self.experts.names if self.experts is not None else set()
            params = [(p, p if self.masters is None else self.masters.master(p))
                      for name, p in gm.named_parameters() if name not in self.sdp_shardings and name not in experts]
            self._dp_sync = grad_sync.OverlappedAllReduce(params, self.groups["dp"], self.dp, {}) if params else None
            if self.experts is not None:  # experts: summed over their replicas only, divided by dp
                self._dp_sync = expert_groups.with_sync(
                    self._dp_sync, self.experts, [(n, p, p if self.masters is None else self.masters.master(p))
                                                  for n, p in gm.named_parameters()], self.dp)
        if z2:  # after the masters' hooks, like the dp sync; divided as layer_groups divides
            self.zero2 = zero2.ShardedGradients(
                [(p, p if self.masters is None else self.masters.master(p), z2[name])
                 for name, p in gm.named_parameters() if name in z2],
                self.groups, self.coords, self.dp if self.layout is None else self.layout.loss_dp)
        self.gm = gm
        self._run = gm  # what computes the graph: the GraphModule, or torch.compile's wrapper of it
        self._prefix = f"pcompile{uid}"
        self.streams = random_streams.bind([gm], plan, self.device, self._prefix, mixed=self.layout is not None)
        return self._registered()

    def _lower_pipeline(self) -> "CompiledModel":
        split = self.ir.pipeline
        if split is None:
            raise PcompileError(f"the plan has pp={self.plan.pp} but the IR was not cut into pipeline stages",
                                "run the 'pipeline_split' pass last among the rewrites (pcompile.api.PIPELINE)")
        uid = next(_COMPILE_IDS)
        self._pipeline = PipelineRuntime(self.ir, self.plan, split, self._model, self.device, uid, self.compute_dtype)
        self.zero2 = self._pipeline.zero2  # its chunks take the values init_weights / load_weights set
        self.groups, self.coords = self._pipeline.groups, self._pipeline.coords
        self.experts = self._pipeline.experts
        self._prefix = f"pcompile{uid}"
        self.streams = random_streams.bind(self._pipeline.modules, self.plan, self.device, self._prefix,
                                           mixed=self.layout is not None)  # a layer's own dp axis in its stage
        return self._registered()

    def _registered(self) -> "CompiledModel":
        """Lowered; with ranks, known to the gradient-norm and optimizer checks (pcompile.runtime)."""
        self._lowered = True
        if dist.is_initialized() and dist.get_world_size() > 1:
            grad_norm.install()
            grad_norm.register(self)
            optimizers.install()
            split = set(self.ir.param_shardings) | set(getattr(self._pipeline or self, "sdp_shardings", {}))
            optimizers.register_split(p for name, p in self.named_parameters() if name in split)
        return self

    def _check_lowered(self, values: bool = True) -> None:
        if not self._lowered:
            raise PcompileError("this compiled model was planned but not lowered (no process group)",
                                "call pcompile.compile under torchrun or pcompile.launch, or use plan() only")
        if values and not self.has_values:
            raise PcompileError("the model was built on the meta device and its weights have no values yet",
                                "call cm.init_weights(seed) or cm.load_weights(path) on every rank first")

    @property
    def has_values(self) -> bool:
        """Whether this rank's parameters hold values (False for a meta-built model until
        init_weights / load_weights)."""
        return (self._pipeline or self).materialised

    # -- weights of a model built on the meta device --------------------------------------------
    def _targets(self, persistent_only: bool = False) -> dict[str, torch.Tensor]:
        """This rank's tensors under every name they have: parameters (their fp32 masters under
        mixed precision) and buffers."""
        modules = self._pipeline.modules if self._pipeline is not None else [self.gm]
        masters = self._pipeline.masters if self._pipeline is not None else self.masters
        out = {}
        for module in modules:
            out.update(materialise.model_tensors(module, persistent_only))
        return out if masters is None else {name: masters.master(t) for name, t in out.items()}

    def _cuts(self, name: str) -> list:
        """How this rank's piece of tensor `name` is cut from the full one: (shard, coordinate) pairs."""
        shards = (self.ir.param_shardings.get(name), self.ir.sdp_shardings.get(name))
        return [(s, self.coords[s.axis]) for s in shards if s is not None and s.size > 1]

    def _filled(self) -> "CompiledModel":
        holder = self._pipeline if self._pipeline is not None else self
        masters = self._pipeline.masters if self._pipeline is not None else self.masters
        if self.zero2 is not None:  # the optimizer's chunks from the values just set
            self.zero2.push(self.coords)
        if masters is not None:  # the bf16 parameters from their masters
            masters.pull()
        holder.materialised = True
        return self

    def init_weights(self, seed: int = 0) -> "CompiledModel":
        """Give this rank's pieces their initial values (call on every rank): deterministic and the
        same under every plan and world size for one seed, `pcompile.init_weights(model, seed)` on
        one device; each module's own initialisation rule, one module at a time
        (pcompile.runtime.materialise)."""
        self._check_lowered(values=False)
        expert_groups.refuse(getattr(self, "experts", None), "init_weights")
        materialise.fill_from_init(self._model, self._targets(), self._cuts, seed)
        return self._filled()

    def load_weights(self, path: str, strict: bool = True) -> "CompiledModel":
        """Load weights (call on every rank): Hugging Face safetensors (a file, or a directory with
        model.safetensors.index.json), each rank reading only its pieces' slices, or a pcompile
        checkpoint directory (pcompile.checkpoint.save), under any plan. Buffers a checkpoint does
        not hold (non-persistent ones, e.g. rotary tables) come from the model's initialisation."""
        self._check_lowered(values=False)
        expert_groups.refuse(getattr(self, "experts", None), "load_weights")
        if os.path.isdir(path) and os.path.exists(os.path.join(path, checkpoint.LATEST)):
            self._filled()
            checkpoint.load(self, path)
            return self
        persistent = self._targets(persistent_only=True)
        transient = {name: t for name, t in self._targets().items() if name not in persistent}
        materialise.fill_from_init(self._model, transient, self._cuts, 0)
        materialise.fill_from_safetensors(path, self._model, persistent, self._cuts, strict)
        return self._filled()

    def manual_seed(self, seed: int) -> "CompiledModel":
        """Reseed the random streams of the lowered graphs (dropout masks; call on every rank with
        one seed): ranks that hold the same activation draw the same masks, the others
        independent ones (pcompile.runtime.rng). Lowering seeds them from rank 0's
        torch.initial_seed(); the process's own generator is never read or advanced by them."""
        self._check_lowered(values=False)
        random_streams.reseed(self.streams, self.plan, seed)
        return self

    def compile(self, backend: str = "inductor", **options) -> "CompiledModel":
        """torch.compile this rank's graphs (every strategy; a pipeline rank: its stages), with
        the eager program's gradients: pcompile's run-time ops (collectives, ZeRO-3's gathers
        and re-gathers, random streams, checkpoint regions) stay eager between compiled
        segments (pcompile.runtime.ops.opaque_to_compiler). `backend` and `options` go to
        torch.compile ("aot_eager" compiles without code generation). Call on every rank,
        before the first step."""
        self._check_lowered(values=False)
        if options.get("fullgraph"):
            raise PcompileError("cm.compile(fullgraph=True): the lowered program breaks the graph at every "
                                "collective and ZeRO-3 gather, which run eagerly", "drop fullgraph=True")
        modules = self._pipeline.modules if self._pipeline is not None else [self.gm]
        for module in modules:
            ops.opaque_to_compiler(module)
        if self._pipeline is not None:
            for stage in self._pipeline.stages:
                stage.submod = torch.compile(stage.submod, backend=backend, **options)
        else:
            self._run = torch.compile(self.gm, backend=backend, **options)
        return self

    # -- training --------------------------------------------------------------------------
    def _local_batch(self, inputs: tuple) -> tuple:
        if self.layout is not None:  # split by the first layer's dp
            inputs = layer_groups.local_batch(self.layout, self.coords, inputs)
        if self.dp == 1 or self.layout is not None:
            return tuple(x.to(self.device) if isinstance(x, torch.Tensor) else x for x in inputs)
        local = []
        for x in inputs:
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                if x.shape[0] % self.dp:
                    raise PcompileError(f"batch of {x.shape[0]} is not divisible by dp={self.dp}",
                                        f"use a global batch that is a multiple of {self.dp}")
                x = x.chunk(self.dp)[self.coords["dp"]]
            local.append(x.to(self.device) if isinstance(x, torch.Tensor) else x)
        return tuple(local)

    # -- the training loop -------------------------------------------------------------------
    @property
    def data_world(self) -> int:
        """How many parts the batch is split into: a DataLoader on this rank loads part `data_rank`
        of `data_world` (ranks that share data - a tp group, a pipeline's stages - load the same)."""
        self._check_lowered(values=False)
        return self.layout.input_dp if self.layout is not None else self.dp

    @property
    def data_rank(self) -> int:
        """This rank's part of the batch (see data_world)."""
        self._check_lowered(values=False)
        return self.coords.get(self.layout.input_axis if self.layout is not None else "dp", 0)

    def sampler(self, dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        """A torch DistributedSampler that gives this rank its part of every batch of `dataset`:
        DataLoader(dataset, batch_size=global_batch // cm.data_world, sampler=cm.sampler(dataset))
        then train_step(*batch, local=True)."""
        from torch.utils.data.distributed import DistributedSampler

        return DistributedSampler(dataset, num_replicas=self.data_world, rank=self.data_rank, shuffle=shuffle,
                                  seed=seed, drop_last=drop_last)

    def _inputs(self, inputs: tuple, local: bool) -> tuple:
        if local:  # this rank's part already (data_rank of data_world)
            return tuple(x.to(self.device) if isinstance(x, torch.Tensor) else x for x in inputs)
        return self._local_batch(inputs)

    def train(self, mode: bool = True) -> "CompiledModel":
        """Train mode (dropout on, batch norm on batch statistics), as the model was captured."""
        self._check_lowered(values=False)
        modules = self._pipeline.modules if self._pipeline is not None else [self.gm]
        for module in modules:
            modes.set_training(module, mode)
        self.training = mode
        return self

    def eval(self) -> "CompiledModel":
        """Eval mode: dropout off, batch norm on its running statistics."""
        return self.train(False)

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation as DDP's no_sync: train_steps inside accumulate this rank's
        gradients without the data-parallel sync; the next train_step outside syncs the sum once.
        Start from zeroed gradients (optimizer.zero_grad()) and end with a synced step."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def train_step(self, *inputs, local: bool = False) -> torch.Tensor:
        """Forward + backward of this rank's part; returns the global loss. `inputs` is the global
        batch, or with local=True this rank's part of it (see data_rank). Gradients accumulate into
        .grad like loss.backward() (zero them between optimizer steps); inside no_sync() without
        the data-parallel sync."""
        self._check_lowered()
        if not self.training:
            raise PcompileError("train_step on a model in eval mode", "call cm.train() before training")
        params = list(self.parameters())
        if all(p.grad is None for p in params):
            self._grads = "clean"
        if not self._sync and self._grads == "synced":
            raise PcompileError("no_sync() accumulation onto gradients that were already synchronised",
                                "zero the gradients (optimizer.zero_grad()) before accumulating under no_sync()")
        # synchronised gradients are set aside and added back after this step's sync; those
        # accumulated under no_sync stay in .grad, where this backward adds to them before the sync
        previous = [p.grad for p in params] if self._grads == "synced" else None
        if previous is not None:
            for p in params:
                p.grad = None
        batch = self._inputs(inputs, local)
        if self._pipeline is None:
            loss = self._step(batch)
        else:
            loss = self._pipeline.train_step(batch, self._sync)
        for p, old in zip(params, previous or ()):
            if old is not None:
                p.grad = old if p.grad is None else p.grad + old
        self._grads = "synced" if self._sync else "pending"
        return loss

    def eval_step(self, *inputs, local: bool = False) -> torch.Tensor:
        """The global loss in eval mode (dropout off, batch norm on running statistics), with no
        gradients: what the serial model gives under torch.no_grad() and model.eval()."""
        self._check_lowered()
        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                batch = self._inputs(inputs, local)
                if self._pipeline is not None:
                    return self._pipeline.eval_step(batch)
                counts = step_counts(self.ir.loss_counts, batch, self._batch_group())
                if self.zero2 is not None:
                    self.zero2.pull()
                if self.masters is not None:
                    self.masters.pull()
                    batch = self.masters.cast_inputs(batch)
                with precision.dtype_errors(self.compute_dtype):
                    return self._global_loss(self._run(*batch, **counts))
        finally:
            self.train(training)

    def _batch_group(self):
        """The ranks that split the batch (and hold the other parts of it), or None."""
        if self.layout is not None:
            return self.groups.get(self.layout.input_axis) if self.layout.input_dp > 1 else None
        return self.groups["dp"] if self.dp > 1 else None

    def _step(self, local: tuple) -> torch.Tensor:
        # masked means: the step's count, summed over the batch's ranks while the forward runs
        counts = issue_step_counts(self.ir.loss_counts, local, self._batch_group())
        if self.zero2 is not None:  # the chunks the optimizer stepped -> the replicated parameters
            self.zero2.pull()
            self.zero2.begin(self._sync)
        if self.masters is not None:
            self.masters.pull()
            local = self.masters.cast_inputs(local)
        if self._dp_sync is not None:
            self._dp_sync.begin(self._sync)
        with precision.dtype_errors(self.compute_dtype):
            loss = self._run(*local, **counts)
        global_loss = self._global_loss(loss, wait=False)  # its reduction runs while backward does
        loss.backward()  # under mixed precision the gradients land in the fp32 masters (precision.py)
        if self.zero2 is not None:  # buckets reduce-scattered during backward
            self.zero2.finish()
        if self._sync and self.layout is not None:  # per-parameter dp groups, scaled by the last layer's dp
            z2 = set(self.sdp_shardings) - set(self.ir.sdp_shardings)
            layer_groups.sync_grads(self.layout, ((n, p) for n, p in self.named_parameters() if n not in z2),
                                    self.ir.sdp_shardings, self.groups)
        elif self._dp_sync is not None:  # buckets issued during backward; sdp gradients were reduce-scattered
            self._dp_sync.finish()
        return global_loss()

    def _global_loss(self, loss: torch.Tensor, wait: bool = True):
        """The mean of the ranks' part losses (fp32 under mixed precision too); with wait=False
        the reduction is issued and a function returning the result once it is done."""
        if self.layout is not None:
            value = layer_groups.global_loss(self.layout, loss, self.groups)
            return value if wait else (lambda: value)
        loss = loss.detach().float().clone()
        work = dist.all_reduce(loss, group=self.groups["dp"], async_op=True) if self.dp > 1 else None

        def result() -> torch.Tensor:
            if work is not None:
                work.wait()
                loss.div_(self.dp)
            return loss
        return result() if wait else result

    # -- gradient norm -----------------------------------------------------------------------
    def _replicas(self) -> dict[int, int]:
        """id of each local parameter -> how many ranks hold that same piece of it."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if self._pipeline is not None:
            return self._pipeline.replicas()
        out = {}
        for name, p in self.named_parameters():
            pieces = math.prod(s.size for s in (self.ir.param_shardings.get(name), self.sdp_shardings.get(name))
                               if s is not None)
            pieces *= self.experts.pieces(name) if self.experts is not None else 1
            out[id(p)] = world // pieces
        return out

    def grad_norm(self, grads: list[torch.Tensor], norm_type: float = 2.0,
                  error_if_nonfinite: bool = False) -> torch.Tensor:
        """Collective: the norm over the whole model of these gradients of this rank's parameters
        (each piece counted once: pcompile.runtime.grad_norm), the same on every rank."""
        self._check_lowered(values=False)
        by_grad = {id(p.grad): (name, p) for name, p in self.named_parameters() if p.grad is not None}
        replicas, terms = self._replicas(), []
        for g in grads:
            name, p = by_grad[id(g)]
            # re-stacked expert weights (FlexMoE): their rows are held by different numbers of ranks
            terms += self.experts.norm_terms(name, g, replicas[id(p)]) if self.experts is not None else \
                [(g, replicas[id(p)])]
        return grad_norm.global_norm([g for g, _ in terms], [n for _, n in terms], norm_type,
                                     error_if_nonfinite, reduce_device=self.device)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        parameters=None) -> torch.Tensor:
        """Collective: clip the gradients to a global norm of `max_norm` as torch's clip_grad_norm_
        does on the serial model; returns the norm before clipping (the same on every rank).
        `parameters`: a subset of cm.parameters() (default all). torch.nn.utils.clip_grad_norm_(
        cm.parameters(), max_norm) computes the same (pcompile.runtime.grad_norm)."""
        params = list(self.parameters() if parameters is None else parameters)
        grads = [p.grad for p in params if p.grad is not None]
        total = self.grad_norm(grads, norm_type, error_if_nonfinite)
        grad_norm.clip_(grads, max_norm, total)
        return total

    # -- expert parallelism: FlexMoE's load rebalancing (backends/expert_rebalance.py) --------
    def expert_loads(self) -> dict[str, list[int]]:
        """Collective over the dp group: tokens routed to each expert per MoE layer, summed over
        the dp group, since the last rebalancing."""
        self._check_lowered(values=False)
        return expert_rebalance.loads(self)

    def rebalance(self, optimizer=None, threshold: float = 1.25, capacity: int | None = None,
                  placements: dict | None = None) -> dict:
        """Collective, between steps: move and replicate experts where the measured load's
        imbalance exceeds `threshold` (FlexMoE), the parameters and `optimizer`'s states moved
        with them; numerics unchanged. Returns layer -> ExpertPlacement applied."""
        self._check_lowered()
        return expert_rebalance.rebalance(self, optimizer, threshold, capacity, placements)

    def parameters(self):
        """What the optimizer steps: the module's parameters, or their fp32 masters under mixed precision."""
        self._check_lowered(values=False)
        if self._pipeline is not None:
            return self._pipeline.parameters()
        return (p for _, p in self.named_parameters())

    def named_parameters(self):
        self._check_lowered(values=False)
        if self._pipeline is not None:
            return self._pipeline.named_parameters()
        named = self.gm.named_parameters() if self.masters is None else self.masters.named_parameters()
        return named if self.zero2 is None else ((name, self.zero2.chunk(p)) for name, p in named)

    # -- full (unsharded) views, collective ------------------------------------------------
    def _full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The full tensor of this rank's piece of `name` (the optimizer's piece: a ZeRO-2 chunk)."""
        if self.experts is not None and self.experts.gathers(name):  # held by ep ranks by their placement
            local, tp = self.experts.full(name, local), self.ir.param_shardings.get(name)
            if name not in self.experts.owner or tp is None:
                return local
            return gather_shards(local, tp, self.groups.get(tp.axis))  # an expert's tp slices (etp)
        zero3, tp = self.sdp_shardings.get(name), self.ir.param_shardings.get(name)
        local = gather_shards(local, zero3, self.groups.get(zero3.axis) if zero3 else None)  # dp, then tp
        return gather_shards(local, tp, self.groups.get(tp.axis) if tp else None)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank gets the full tensors, named as in the original model's state_dict()."""
        self._check_lowered()
        if self._pipeline is not None:
            return self._pipeline.full_state_dict()
        local = self.gm.state_dict(keep_vars=True)
        if self.masters is not None:  # fp32 masters; bf16 buffers back in their original dtype
            local.update(self.masters.by_name())
        if self.zero2 is not None:  # the optimizer's chunks (the replicated copies wait for the next pull)
            local = {name: self.zero2.chunk(t) for name, t in local.items()}
        out = {}
        for name, original in self._model.state_dict().items():
            out[name] = (self._full(name, local[name]).to(original.dtype).cpu() if name in local
                         else original.detach().clone())
        return out

    def full_grads(self) -> dict[str, torch.Tensor | None]:
        """Full gradients named as in the original model's named_parameters()."""
        self._check_lowered()
        if self._pipeline is not None:
            return self._pipeline.full_grads()
        local = dict(self.gm.named_parameters(remove_duplicate=False) if self.masters is None
                     else self.masters.by_name())
        if self.zero2 is not None:
            local = {name: self.zero2.chunk(t) for name, t in local.items()}
        out = {}
        for name, _ in self._model.named_parameters():
            p = local.get(name)
            out[name] = None if p is None or p.grad is None else self._full(name, p.grad).cpu()
        return out

    def close(self) -> None:
        """Collective: destroy this model's process groups (each compile creates its own; a
        process that compiles many models, like the fuzz test, would otherwise keep every
        group's threads alive)."""
        if not self._lowered:
            return
        rng.unregister(self._prefix)
        if self.experts is not None:  # its layers' routings
            self.experts.close()
        if not dist.is_initialized():
            self._lowered = False
            return
        groups = self._pipeline.process_groups() if self._pipeline is not None else list(self.groups.values())
        collectives.unbind_groups(groups)
        seen = set()
        for group in groups:
            if group is not None and id(group) not in seen and group is not dist.group.WORLD:
                seen.add(id(group))
                dist.destroy_process_group(group)
        self._lowered = False

    def __repr__(self) -> str:
        return f"CompiledModel(\n{self.plan}\n)"
