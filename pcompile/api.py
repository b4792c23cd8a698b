"""Public API: `compile()` reads as the pipeline; `plan()` stops after the search; `estimate()`
prices a given plan as the search prices the plans it weighs."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import os

import torch

import pcompile.passes  # noqa: F401  (registers the passes the pipeline names)
from pcompile.backends import CompiledModel
from pcompile.cluster import Cluster
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.ir.pass_manager import PassContext, PassManager
from pcompile.options import CompileOptions
from pcompile.plan import Estimate, Plan

PIPELINE = [
    "trace",            # capture the model as an fx graph: everything after is a pass over it
    "shapes",           # fake-tensor shapes first: every cost below is a function of them
    "flops",            # compute per node, for the search's time estimate
    "memory",           # saved activations and parameter bytes, for the memory constraint
    "layers",           # the units the search assigns strategies to
    "search",           # the plan (or the user's forced plan, checked, staged and priced)
    "loss_check",       # needs the plan: a summed or batch-coupled loss is refused where dp / micro-batches average it
    "normalise_loss",   # masked means (ignore_index, loss masks) divide by the step's count, not each part's
    "batch_statistics",  # loss terms made of batch statistics (MoE aux losses) read the whole batch's
    "expert_parallel",  # ep layers: experts over ep ranks, tokens sent by all-to-all (before tp: experts leave)
    "tensor_parallel",  # make the plan's tp real: split weights, insert tp_copy / tp_reduce
    "sequence_parallel",  # sp layers: tp_copy/tp_reduce -> all-gather/reduce-scatter over seq (needs TP's collectives)
    "operator_split",   # OSDP: Linears -> k input-feature chunks (needs TP's row-parallel form first)
    "sharded_data_parallel",  # ZeRO-3 layers: params sharded over dp, gathered per layer (per op if split)
    "reshard",          # layers at other (dp, tp) groupings: degree-named axes, batch regrouped between layers
    "activation_checkpoint",  # wrap each checkpointed layer's final nodes, collectives included, in one region
    "pipeline_split",   # last: cut the final graph, with every inserted collective, into stages
]
PLAN_PIPELINE = PIPELINE[: PIPELINE.index("search") + 1]


def fingerprint(model: torch.nn.Module) -> str:
    """Identifies a model architecture by its parameter names and shapes (not values)."""
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return digest.hexdigest()[:16]


def _context(model, cluster, example_inputs, plan, options: CompileOptions) -> PassContext:
    if not isinstance(model, torch.nn.Module):
        raise PcompileError(f"compile() needs an nn.Module, got {type(model).__name__}",
                            "pass the model object whose forward returns the loss")
    if not isinstance(cluster, Cluster):
        raise PcompileError(f"cluster must be a pcompile.Cluster, got {type(cluster).__name__}",
                            "use pcompile.Cluster.preset('8xA100-80GB') or pcompile.Cluster.local(n)")
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise PcompileError("example_inputs must be a non-empty tuple, e.g. (inputs, targets)",
                            "pass example_inputs=(x, y) with the global batch")
    if plan is not None and not isinstance(plan, Plan):
        raise PcompileError(f"plan must be a pcompile.Plan, got {type(plan).__name__}",
                            "use pcompile.Plan.uniform(dp=..., tp=...) or Plan.from_json(...)")
    model_id = fingerprint(model)
    if plan is not None and plan.model and plan.model != model_id:
        raise PcompileError("the plan was made for another model (its parameter names or shapes differ)",
                            "re-plan for this model with pcompile.plan(...) or `pcompile plan`")
    return PassContext(model=model, cluster=cluster, example_inputs=tuple(example_inputs), options=options,
                       fingerprint=model_id, plan=plan)


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector off while planning (restored as it was after): a plan
    allocates hundreds of thousands of objects that live on (the IR's nodes and metadata) or
    die by reference counting, and each full collection rescans them all - half a second of
    a 5 s GPT-3 plan. The few cycles a plan leaves are collected by the collector's next run."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _run(manager: PassManager, ctx: PassContext) -> IR:
    if manager.debug_dir is not None:
        os.makedirs(manager.debug_dir, exist_ok=True)
    ir = manager.run(None, ctx)
    if ctx.plan is not None:
        ctx.plan = dataclasses.replace(ctx.plan, model=ctx.fingerprint)
    return ir


def plan(model: torch.nn.Module, cluster: Cluster, example_inputs: tuple, *, capture: str = "auto",
         debug_dir: str | None = None, search_space: dict | None = None,
         mixed_precision: str | None = None, global_batch=None, offload_optimizer: bool = False) -> Plan:
    """The plan compile() would run, found on fake tensors: no process group, no GPU, no weights touched.

    `search_space` narrows the search, with the fields of pcompile.search.space.SearchSpace,
    e.g. {"pp_degrees": (1,)} for no pipelining or {"checkpoint": (False,)}.
    `mixed_precision` as in compile(): "bf16" costs bf16 parameters, gradients and activations
    with fp32 master weights and optimizer moments.
    `global_batch`: the global batch sizes the user allows (an int or an iterable, e.g.
    range(64, 513, 64)); the plan takes the one with the most samples per second (costs scale
    from the example inputs' batch) and records it in Plan.global_batch: compile it with
    example inputs of that many samples. None: the example inputs' batch.
    `offload_optimizer=True` (ZeRO-Offload, as compile()'s): the fp32 masters, their gradients and
    the optimizer's moments live in host memory and the optimizer steps on the CPU; the devices
    hold the compute-dtype parameters (ZeRO-3 chunks) and transient gradients, and the step pays
    the host transfers and the CPU step (pcompile.cost.offload.offload_time). One-stage ZeRO-3
    plans only (Plan.offload_optimizer)."""
    return plan_and_ir(model, cluster, example_inputs, capture=capture, debug_dir=debug_dir,
                       search_space=search_space, mixed_precision=mixed_precision, global_batch=global_batch,
                       offload_optimizer=offload_optimizer)[0]


def plan_and_ir(model: torch.nn.Module, cluster: Cluster, example_inputs: tuple, *, rewrite: bool = False,
                capture: str = "auto", debug_dir: str | None = None, search_space: dict | None = None,
                mixed_precision: str | None = None, global_batch=None,
                offload_optimizer: bool = False) -> tuple[Plan, IR]:
    """plan(), and the IR it was found on, from one capture: the analysed IR the search read
    (its totals: FLOPs, parameter bytes), or with `rewrite` the IR after every rewrite of
    compile()'s pipeline for that plan (what ONNX export, plots and the pass dump need; the
    rewrites run on the example inputs, so not with a range of global batches)."""
    options = CompileOptions.make(capture, search_space, mixed_precision, global_batch,
                                  offload_optimizer=offload_optimizer)
    if rewrite and len(options.global_batches or ()) > 1:
        raise PcompileError("rewriting for a plan needs the global batch it runs, not a range to choose from",
                            "plan with the range first, then compile(..., plan=plan) with inputs of plan.global_batch")
    ctx = _context(model, cluster, example_inputs, None, options)
    manager = PassManager(PIPELINE if rewrite else PLAN_PIPELINE, debug_dir=debug_dir,
                          stop_after=PIPELINE[-1] if rewrite else None)
    with collector_paused():
        ir = _run(manager, ctx)
    return ctx.plan, ir


def estimate(model: torch.nn.Module, cluster: Cluster, example_inputs: tuple, plan: Plan, *,
             capture: str = "auto", mixed_precision: str | None = None) -> Estimate:
    """What the cost model predicts for `plan` (step time, peak memory per device), priced as the
    search prices the plans it weighs: the same cost tables and stage evaluation, the plan's
    per-layer strategies, stages, micro-batches and schedule. For a plan the search returned,
    `estimate(...) == plan.estimate`; compile(plan=...) reports the same figure. Runs the
    analyses and the search pass's check of a forced plan (fake tensors, no process group)."""
    if not isinstance(plan, Plan):
        raise PcompileError(f"plan must be a pcompile.Plan, got {type(plan).__name__}",
                            "use pcompile.plan(...), pcompile.Plan.uniform(...) or Plan.from_json(...)")
    ctx = _context(model, cluster, example_inputs, plan, CompileOptions.make(
        capture, mixed_precision=mixed_precision, offload_optimizer=plan.offload_optimizer))
    with collector_paused():
        _run(PassManager(PLAN_PIPELINE), ctx)
    return ctx.plan.estimate


def compile(model: torch.nn.Module, cluster: Cluster, example_inputs: tuple, plan: Plan | None = None, *,
            debug_dir: str | None = None, capture: str = "auto", stop_after: str | None = None,
            verify: bool = True, passes: list[str] | None = None, search_space: dict | None = None,
            mixed_precision: str | None = None, offload_optimizer: bool = False):
    """Plan (or take `plan`), rewrite and lower `model` for `cluster`.

    Returns a CompiledModel for this rank; with `stop_after="pass-name"`, the IR at that point.
    `passes` replaces the default pipeline (a list of registered pass names) for experiments.
    `mixed_precision="bf16"`: the rank's module computes in bf16 while cm.parameters() (what the
    optimizer steps, what full_state_dict / checkpoints hold) are fp32 masters (pcompile.runtime.precision);
    None (the default) runs fp32 throughout.
    `offload_optimizer=True`: the optimizer's masters and moments in host memory, stepped on the
    CPU (see plan()); a given `plan` is run offloaded then too (its own Plan.offload_optimizer
    counts either way).
    """
    if isinstance(plan, Plan) and offload_optimizer and not plan.offload_optimizer:
        plan = dataclasses.replace(plan, offload_optimizer=True)  # checked there: ZeRO-3, one stage
    offload = plan.offload_optimizer if isinstance(plan, Plan) else offload_optimizer  # a non-Plan: _context refuses
    options = CompileOptions.make(capture, search_space, mixed_precision, offload_optimizer=offload)
    ctx = _context(model, cluster, example_inputs, plan, options)
    manager = PassManager(PIPELINE if passes is None else list(passes), verify_each=verify, debug_dir=debug_dir,
                          stop_after=stop_after)
    ir = _run(manager, ctx)
    if stop_after is not None:
        return ir
    compiled = CompiledModel(ir, ctx.plan, model, ctx.report, mixed_precision=mixed_precision,
                             offload_optimizer=ctx.plan.offload_optimizer)
    compiled.timings = manager.timings
    if torch.distributed.is_initialized() or ctx.plan.num_devices == 1:
        compiled.lower()
    return compiled


__all__ = ["compile", "plan", "plan_and_ir", "estimate", "fingerprint", "IR", "PIPELINE"]
