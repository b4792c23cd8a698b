"""Public API: `compile()` reads as the pipeline; `plan()` stops after the search."""
from __future__ import annotations

import dataclasses
import hashlib
import os

import torch

from pcompile.runtime import precision
from pcompile.cluster import Cluster
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.ir.pass_manager import PassContext, PassManager
from pcompile.plan import Plan

PIPELINE = [
    "trace",            # capture the model as an fx graph: everything after is a pass over it
    "shapes",           # fake-tensor shapes first: every cost below is a function of them
    "flops",            # compute per node, for the search's time estimate
    "memory",           # saved activations and parameter bytes, for the memory constraint
    "layers",           # the units the search assigns strategies to
    "search",           # the plan (or the user's forced plan, checked and costed)
    "loss_check",       # needs the plan: a summed loss is refused where dp / micro-batches average it
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


def _context(model, cluster, example_inputs, plan, capture, search_space=None, mixed_precision=None,
             global_batches=None) -> PassContext:
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
    ctx = PassContext(model=model, cluster=cluster, example_inputs=tuple(example_inputs), plan=plan,
                      capture=capture)
    ctx.options["fingerprint"] = model_id
    precision.compute_dtype(mixed_precision)  # an unknown choice fails before any pass runs
    ctx.options["search_space"] = dict(search_space or {})
    ctx.options["mixed_precision"] = mixed_precision  # the search costs bf16 states and activations
    ctx.options["global_batches"] = global_batches  # None: the example inputs' batch
    return ctx


def _run(names, model, cluster, example_inputs, plan, debug_dir, capture, stop_after, verify, search_space=None,
         mixed_precision=None, global_batches=None):
    ctx = _context(model, cluster, example_inputs, plan, capture, search_space, mixed_precision, global_batches)
    if debug_dir is not None:
        os.makedirs(debug_dir, exist_ok=True)
    manager = PassManager(names, verify_each=verify, debug_dir=debug_dir, stop_after=stop_after)
    ir = manager.run(None, ctx)
    if ctx.plan is not None:
        ctx.plan = dataclasses.replace(ctx.plan, model=ctx.options["fingerprint"])
    return ir, ctx, manager


def _global_batches(global_batch) -> tuple[int, ...] | None:
    if global_batch is None:
        return None
    values = (global_batch,) if isinstance(global_batch, int) else tuple(global_batch)
    if not values or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in values):
        raise PcompileError(f"global_batch={global_batch!r} must be a positive int or an iterable of them",
                            "pass e.g. global_batch=range(64, 513, 64) or global_batch=(128, 256)")
    return tuple(sorted(set(values)))


def plan(model: torch.nn.Module, cluster: Cluster, example_inputs: tuple, *, capture: str = "auto",
         debug_dir: str | None = None, search_space: dict | None = None,
         mixed_precision: str | None = None, global_batch=None) -> Plan:
    """The plan compile() would run, found on fake tensors: no process group, no GPU, no weights touched.

    `search_space` narrows the search, with the fields of pcompile.search.space.SearchSpace,
    e.g. {"pp_degrees": (1,)} for no pipelining or {"checkpoint": (False,)}.
    `mixed_precision` as in compile(): "bf16" costs bf16 parameters, gradients and activations
    with fp32 master weights and optimizer moments.
    `global_batch`: the global batch sizes the user allows (an int or an iterable, e.g.
    range(64, 513, 64)); the plan takes the one with the most samples per second (costs scale
    from the example inputs' batch) and records it in Plan.global_batch: compile it with
    example inputs of that many samples. None: the example inputs' batch."""
    _, ctx, _ = _run(PLAN_PIPELINE, model, cluster, example_inputs, None, debug_dir, capture, None, True,
                     search_space, mixed_precision, _global_batches(global_batch))
    return ctx.plan


def compile(model: torch.nn.Module, cluster: Cluster, example_inputs: tuple, plan: Plan | None = None, *,
            debug_dir: str | None = None, capture: str = "auto", stop_after: str | None = None,
            verify: bool = True, passes: list[str] | None = None, search_space: dict | None = None,
            mixed_precision: str | None = None):
    """Plan (or take `plan`), rewrite and lower `model` for `cluster`.

    Returns a CompiledModel for this rank; with `stop_after="pass-name"`, the IR at that point.
    `passes` replaces the default pipeline (a list of registered pass names) for experiments.
    `mixed_precision="bf16"`: the rank's module computes in bf16 while cm.parameters() (what the
    optimizer steps, what full_state_dict / checkpoints hold) are fp32 masters (pcompile.runtime.precision);
    None (the default) runs fp32 throughout.
    """
    from pcompile.backends import CompiledModel

    names = PIPELINE if passes is None else list(passes)
    ir, ctx, manager = _run(names, model, cluster, example_inputs, plan, debug_dir, capture, stop_after, verify,
                            search_space, mixed_precision)
    if stop_after is not None:
        return ir
    compiled = CompiledModel(ir, ctx.plan, model, ctx.report, mixed_precision=mixed_precision)
    compiled.timings = manager.timings
    if torch.distributed.is_initialized() or ctx.plan.num_devices == 1:
        compiled.lower()
    return compiled


__all__ = ["compile", "plan", "fingerprint", "IR"]
