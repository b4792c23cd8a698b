"""Rewrite: cut the graph into pipeline stages (plan.pp > 1).

Stage assignment. There are S = pp * plan.virtual_stages stages (model chunks): each pp rank
runs v = plan.virtual_stages of them (v > 1 only with interleaved 1F1B), stage s on pp rank
s mod pp (the looped placement torch's ScheduleInterleaved1F1B expects); with v = 1 a stage
is a pp rank. Layer l runs in stage `plan.layers[l].stage` (0..S-1): the search pass gives
every layer one, the search's partition or the forced plan's (cut by the cost model where the
user named none: pcompile.cost.plan_price.with_stages), so the graph is cut where the plan's
estimate says.

Cut. Each stage becomes its own fx.GraphModule whose positional inputs are the activations
live across its left boundary (tensors computed in an earlier stage and used here or later;
values that skip a stage pass through it) and whose keyword inputs are the model's inputs
(every stage may read them, e.g. the targets in the last stage: torch.distributed.pipelining
passes keyword arguments to every stage). Parameters and buffers are read through get_attr /
call_module under their original names, so a stage's state_dict keys are the model's.
The last stage returns the model's output: the loss of its micro-batch.

The flat graph stays `ir.gm` (other passes and the debug dump read it); the cut is recorded
as a `PipelineSplit` in `ir.pipeline`.
Tied parameters (GPT's embedding = LM head) end up in two stages on different ranks:
the backend all-reduces their gradient between the owning ranks after backward, so the
copies receive the same update (`PipelineSplit.tied`).
"""
from __future__ import annotations

import inspect

import torch.fx as fx

from pcompile.errors import PcompileError
from pcompile.ir import IR, PipelineSplit, Stage
from pcompile.ir.params import canonical
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.plan import Plan

FREE_OPS = ("placeholder", "get_attr")  # re-created in every stage that reads them, never sent


# -- checks ---------------------------------------------------------------------------------
def check_schedule(plan: Plan, batch: int) -> None:
    """torch's schedules' own limits, said at compile time rather than on the ranks."""
    n, pp = plan.num_microbatches, plan.pp
    if plan.schedule == "1F1B" and n < pp:
        raise PcompileError(f"schedule 1F1B with pp={pp} needs at least {pp} micro-batches, the plan has {n}",
                            f"set num_microbatches={2 * pp} (dataclasses.replace(plan, num_microbatches=...)) "
                            "or use schedule='GPipe'")
    if plan.schedule == "Interleaved1F1B" and n % max(1, n // pp):
        raise PcompileError(f"schedule Interleaved1F1B needs num_microbatches to be a multiple of "
                            f"{max(1, n // pp)} (rounds of pp={pp}), the plan has {n}",
                            f"set num_microbatches to a multiple of pp={pp}")
    if batch % (plan.default.dp * n):
        raise PcompileError(f"global batch {batch} does not split into dp={plan.default.dp} x {n} micro-batches",
                            f"use a batch that is a multiple of {plan.default.dp * n}")


# -- cut -----------------------------------------------------------------------------------
def free_nodes(ir: IR) -> set[fx.Node]:
    """Nodes every stage re-creates instead of receiving: placeholders, get_attrs, and the Python
    values (not tensors) computed from those alone, e.g. torch.export's `sym_size(input_ids, 0)`.
    Recomputed in a stage from its micro-batch's inputs they give that micro-batch's sizes, which
    is what the serial model computes on it; stages exchange tensors only, so they cannot be sent.
    A value with no users (an assertion) stays in its layer's stage."""
    free: set[fx.Node] = set()
    for n in ir.graph.nodes:
        if n.op in FREE_OPS or (n.op in ("call_function", "call_method") and n.users and ir.meta(n).shape is None
                                and all(a in free for a in n.all_input_nodes)):
            free.add(n)
    return free


def _stage_of_nodes(ir: IR, layer_stage: dict[str, int]) -> dict[fx.Node, int]:
    free = free_nodes(ir)
    return {n: layer_stage[ir.meta(n).layer] for n in ir.graph.nodes if n not in free}


def live_inputs(ir: IR, stage_of: dict[fx.Node, int], num_stages: int) -> list[list[fx.Node]]:
    """For each stage, the values computed in an earlier stage and used in it or later."""
    carried: list[list[fx.Node]] = [[] for _ in range(num_stages)]
    for node, stage in stage_of.items():
        if node.op == "output":
            continue
        last_use = max((stage_of[u] for u in node.users), default=stage)
        for user in node.users:
            if stage_of[user] < stage:
                raise PcompileError(f"internal error: {user.name} (stage {stage_of[user]}) uses {node.name} "
                                    f"from the later stage {stage}", "this is a pcompile bug; please report it")
        if last_use > stage and ir.meta(node).shape is None:
            raise PcompileError(
                f"{node.name} ({ir.meta(node).layer}) is a Python value, not a tensor, and is used in a later "
                "pipeline stage; stages exchange tensors only",
                "compute sizes from the tensors inside the layer that uses them (e.g. x.shape in the block)")
        for b in range(stage + 1, last_use + 1):
            carried[b].append(node)
    return carried


def build_stage(ir: IR, stage_of: dict[fx.Node, int], index: int, inputs: list[fx.Node],
                outputs: list[fx.Node] | None) -> fx.GraphModule:
    """The stage's GraphModule: forward(*inputs, **model_inputs) -> tuple(outputs) (or the loss)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    # received values, model inputs and get_attrs keep the meta of the node they stand for (as
    # node_copy keeps it for the rest): its shape and capture dtype, which the lowering reads
    # (pcompile.runtime.precision.follow_run_time_dtype)
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in ir.graph.nodes:
        if node.op == "placeholder":
            default = node.args[0] if node.args else inspect.Signature.empty
            env[node] = graph.placeholder(node.target, default_value=default)
            env[node].meta = dict(node.meta)

    def value(arg: fx.Node) -> fx.Node:
        """A value this stage reads: its own or a received one, or a free node re-created on first use."""
        if arg not in env and arg not in stage_of:
            if arg.op == "get_attr":
                env[arg] = graph.get_attr(arg.target)
                env[arg].meta = dict(arg.meta)
            else:
                env[arg] = graph.node_copy(arg, value)
        return env[arg]

    for node in ir.graph.nodes:
        if node not in stage_of or stage_of[node] != index:
            continue
        if node.op == "output":
            graph.output(value(loss_node(ir)))
            continue
        env[node] = graph.node_copy(node, value)
    if outputs is not None:  # sent with gloo/NCCL p2p, which take contiguous tensors only (a no-op if already)
        graph.output(tuple(graph.call_method("contiguous", (env[n],)) for n in outputs))
    graph.lint()
    return fx.GraphModule(ir.gm, graph, class_name=f"Stage{index}")


def loss_node(ir: IR) -> fx.Node | None:
    """The node of the scalar loss the model returns: the output itself (torch.fx) or the only
    element of the output tuple (torch.export flattens every output into one)."""
    out = next(n for n in ir.graph.nodes if n.op == "output").args[0]
    if isinstance(out, (tuple, list)) and len(out) == 1:
        out = out[0]
    return out if isinstance(out, fx.Node) and ir.meta(out).shape == () else None


def _check_output(ir: IR) -> None:
    out = next(n for n in ir.graph.nodes if n.op == "output").args[0]
    if loss_node(ir) is None:
        raise PcompileError("pipeline parallelism needs the model's forward to return the scalar loss; it returns "
                            f"{out!r}", "return only the loss (a 0-dim tensor) from forward")


def split(ir: IR, plan: Plan, names: dict[str, str]) -> PipelineSplit:
    """The stages of the plan's cut (`names`: every parameter name -> its canonical one)."""
    num_stages = plan.pp * plan.virtual_stages
    layer_stage = {a.layer: a.stage for a in plan.layers}
    missing = [layer for layer in ir.layers if layer not in layer_stage]
    if missing:
        raise PcompileError(f"internal error: the plan gives no stage to layers {missing}",
                            "this is a pcompile bug (the search pass gives every layer a stage); please report it")
    stage_of = _stage_of_nodes(ir, layer_stage)
    carried = live_inputs(ir, stage_of, num_stages)
    stages = []
    for s in range(num_stages):
        outputs = carried[s + 1] if s + 1 < num_stages else None
        gm = build_stage(ir, stage_of, s, carried[s], outputs)
        stages.append(Stage(s, s % plan.pp, tuple(layer for layer in ir.layers if layer_stage[layer] == s),
                            tuple(n.name for n in carried[s]),
                            tuple(n.name for n in outputs) if outputs else ("loss",), gm))
    holders: dict[str, set[int]] = {}
    for stage in stages:
        for name, _ in stage.gm.named_parameters(remove_duplicate=False):
            holders.setdefault(names.get(name, name), set()).add(stage.rank)
    tied = tuple(sorted(name for name, ranks in holders.items() if len(ranks) > 1))
    counts = set(ir.loss_counts.placeholders) if ir.loss_counts else set()  # passed by the backend, not the user
    model_inputs = tuple(n.target for n in ir.graph.nodes if n.op == "placeholder" and n.target not in counts)
    return PipelineSplit(plan.pp, tuple(stages), model_inputs, names, tied)


@register_pass("pipeline_split", kind="rewrite", requires=("plan", "activation_checkpoint"),
               ensures=("pipeline_split",))
def pipeline_split(ir: IR, ctx: PassContext) -> IR:
    """Cut the graph into pipeline stages (pp x chunks) at layer boundaries, where the plan says."""
    plan = ctx.plan
    if plan.pp == 1:
        return ir
    _check_output(ir)
    first = ctx.example_inputs[0]
    check_schedule(plan, int(first.shape[0]) if getattr(first, "ndim", 0) else 1)
    result = split(ir, plan, canonical(ctx.model))
    for s in result.stages:
        ctx.report.append(f"pipeline stage {s.index} on pp rank {s.rank}: {s.layers[0]}..{s.layers[-1]}, "
                          f"receives {list(s.inputs) or 'the model inputs'}")
    if result.tied:
        ctx.report.append(f"tied parameters {list(result.tied)} live in stages on different ranks: their "
                          "gradients are all-reduced between the owning ranks after backward")
    return ir.replace(pipeline=result)
