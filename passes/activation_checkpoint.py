"""Rewrite: activation checkpointing per layer (non-reentrant `torch.utils.checkpoint`).

For every layer whose strategy says `checkpoint=True`, the layer's nodes (contiguous in graph
order) become one region: an fx GraphModule whose inputs are the values the layer reads from
outside and whose outputs are the values used after it. The layer's nodes are replaced by

    region = get_attr pcompile_ckpt_<layer>      # the region graph: holds no parameters
    refs   = get_attr <leaf module path>         # one per module the layer calls
    out    = run_checkpointed(region, *inputs, *refs)

so autograd keeps only the region's inputs in forward and re-runs the region in backward.

Why modules and parameters are *passed in* rather than owned by the region: parameters keep
their original names (the backend shards and gathers them by the original model's names) and
appear exactly once in `gm.named_parameters()` and `gm.state_dict()`; the backend's in-place
replacement of a sharded parameter on its original owner module is seen by the region. Inside
the region a call of module `m` is `call_module_ref(m, *args)`.

Costs, as recorded in the NodeMeta of the call: saved_bytes = the bytes of its activation
inputs (what checkpointing keeps; parameters excluded), flops = the region's forward FLOPs,
bwd_flops = the region's backward FLOPs + one more forward (the recompute). A region that
contains tensor-parallel collectives (tp_copy / tp_reduce) re-runs their *forward* in the
recompute: one extra all-reduce of each tp_reduce's output per checkpointed layer per step
(tp_copy's forward is the identity and costs nothing). All ranks of a tp group recompute the
same regions in the same order, so the extra collectives match up.

Ordering: after tensor_parallel and operator_split (their rewrites must see the layer's nodes),
as the last graph rewrite; the region's inner graph holds collective nodes, so the backend must
bind axis names in nested GraphModules too.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from pcompile.errors import PcompileError
from pcompile.ir import IR, NodeMeta
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.runtime.checkpointing import call_module_ref, run_checkpointed

PREFIX = "pcompile_ckpt_"


def region_name(layer: str) -> str:
    return PREFIX + "".join(c if c.isalnum() else "_" for c in layer)


def layer_region(ir: IR, layer: str) -> list[fx.Node]:
    """The layer's computing nodes (placeholders and the output stay outside), checked contiguous
    among the graph's computing nodes: the graph's inputs stay outside every region, so they may
    sit between a layer's nodes (torch.export puts the get_attrs of HF Llama's `pre` first, then
    the placeholders, then the rest)."""
    order = {node: i for i, node in enumerate(n for n in ir.graph.nodes if n.op != "placeholder")}
    nodes = [n for n in ir.nodes_of(layer) if n.op not in ("placeholder", "output")]
    positions = [order[n] for n in nodes]
    if positions and positions[-1] - positions[0] + 1 != len(positions):
        raise PcompileError(f"internal error: layer {layer!r} is not contiguous in graph order",
                            "this is a pcompile bug (a rewrite placed a node of another layer inside it); "
                            "please report it")
    return nodes


def boundary(body: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """(values the body reads from outside, body values used outside), each in graph order.
    get_attr nodes are not part of a body: parameters enter as inputs."""
    members = set(body)
    inputs: dict[fx.Node, None] = {}
    for node in body:
        for source in node.all_input_nodes:
            if source not in members:
                inputs[source] = None
    outputs = [n for n in body if any(user not in members for user in n.users)]
    return list(inputs), outputs


def build_region(body: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node],
                 modules: list[str]) -> fx.GraphModule:
    """A parameter-free GraphModule computing `outputs` from (*inputs, *modules)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    refs = {target: graph.placeholder("mod_" + target.replace(".", "_")) for target in modules}
    for node in body:
        if node.op == "call_module":
            args = fx.map_arg(node.args, env.__getitem__)
            kwargs = fx.map_arg(node.kwargs, env.__getitem__)
            env[node] = graph.create_node("call_function", call_module_ref, (refs[node.target],) + tuple(args),
                                          dict(kwargs), name=node.name)
            env[node].meta = dict(node.meta)
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    result = env[outputs[0]] if len(outputs) == 1 else tuple(env[n] for n in outputs)
    graph.output(result)
    return fx.GraphModule(torch.nn.Module(), graph)


def _meta_like(ir: IR, node: fx.Node, layer: str, like: fx.Node | None = None) -> NodeMeta:
    meta = ir.meta(node)
    meta.layer = layer
    if like is not None:
        src = ir.meta(like)
        meta.shape, meta.dtype, meta.value = src.shape, src.dtype, src.value
        meta.output_bytes, meta.placement = src.output_bytes, src.placement
    return meta


def kept_bytes(ir: IR, inputs: list[fx.Node]) -> int:
    """What checkpointing keeps alive: the activation inputs (parameters are model state)."""
    return sum(ir.meta(n).output_bytes for n in inputs if n.op != "get_attr" and ir.has_meta(n))


def checkpoint_layer(ir: IR, layer: str) -> fx.Node | None:
    """Replace `layer`'s nodes by one run_checkpointed call; returns the call (None: nothing to do)."""
    nodes = layer_region(ir, layer)
    body = [n for n in nodes if n.op != "get_attr"]
    if not body:
        return None
    inputs, outputs = boundary(body)
    if not outputs:
        return None
    modules = list(dict.fromkeys(n.target for n in body if n.op == "call_module"))
    name = region_name(layer)
    if hasattr(ir.gm, name):
        raise PcompileError(f"internal error: layer {layer!r} is checkpointed twice",
                            "run the activation_checkpoint pass once per pipeline")
    ir.gm.add_submodule(name, build_region(body, inputs, outputs, modules))
    graph = ir.graph
    with graph.inserting_after(body[-1]):
        region = graph.get_attr(name)
    _meta_like(ir, region, layer)
    refs = []
    for target in modules:
        with graph.inserting_after(refs[-1] if refs else region):
            refs.append(graph.get_attr(target))
        _meta_like(ir, refs[-1], layer)
    with graph.inserting_after(refs[-1] if refs else region):
        call = graph.call_function(run_checkpointed, (region, *inputs, *refs))
    meta = _meta_like(ir, call, layer, outputs[0] if len(outputs) == 1 else None)
    metas = [ir.meta(n) for n in body]
    meta.flops = sum(m.flops for m in metas)
    meta.bwd_flops = sum(m.bwd_flops for m in metas) + meta.flops
    meta.param_bytes = sum(m.param_bytes for m in metas)
    meta.saved_bytes = kept_bytes(ir, inputs)
    meta.output_bytes = sum(ir.meta(n).output_bytes for n in outputs)
    replacements = {outputs[0]: call}
    if len(outputs) > 1:
        replacements, previous = {}, call
        for index, out in enumerate(outputs):
            with graph.inserting_after(previous):
                previous = graph.call_function(operator.getitem, (call, index))
            _meta_like(ir, previous, layer, out)
            replacements[out] = previous
    members = set(body)
    for out, new in replacements.items():
        out.replace_all_uses_with(new, delete_user_cb=lambda user: user not in members)
    for node in reversed(body):
        graph.erase_node(node)
    return call


@register_pass("activation_checkpoint", kind="rewrite",
               requires=("tensor_parallel", "sequence_parallel", "operator_split", "sharded_data_parallel", "reshard"),
               ensures=("activation_checkpoint",))
def activation_checkpoint(ir: IR, ctx: PassContext) -> IR:
    """Wrap each checkpointed layer's nodes into one non-reentrant torch.utils.checkpoint call."""
    layers = [layer for layer in ir.layers if ctx.plan.strategy_for(layer).checkpoint]
    done = [layer for layer in layers if checkpoint_layer(ir, layer) is not None]
    if not done:
        return ir
    ir.graph.lint()
    ir.gm.recompile()
    saved = sum(ir.total("saved_bytes", layer) for layer in done)
    ctx.report.append(f"checkpoint: {len(done)} layer(s) recompute their activations in backward "
                      f"({', '.join(done)}); they keep {saved / 2**20:.2f} MiB of inputs for backward")
    return ir
