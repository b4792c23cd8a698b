"""Rewrite: expert parallelism (DeepSpeed-MoE / Megatron-Core) for the layers whose strategy has ep > 1.

Each MoE layer (pcompile.sharding.moe) of the `modules` form - a ModuleList of 2-Linear expert
MLPs whose gated outputs are summed, the gates the top-k's scattered into a (token, expert)
matrix - has its dense mixture (every expert on every token) replaced by one
`expert_mixture(tokens, indices, gates, activation, "ep", ep, E, has_bias, *expert params)`
node (pcompile.runtime.expert_parallel): the ep ranks of a group (inside the dp group, see
backends/expert_groups.py) each compute E/ep experts on the tokens routed to them, dispatched
and combined with all-to-alls of variable split sizes (dropless). The router, the top-k, the
gates and any load-balancing loss made of them are untouched (their batch statistics are the
batch_statistics pass's, as under dp).

Storage and gradients: each rank holds only its E/ep experts (backends/expert_groups.py drops
the others at lowering). The serial loss is L = (1/dp) sum_r L_r over the dp ranks' parts, and
dp averaging gives every replicated parameter (1/dp) sum_r dL_r/dtheta. Expert e's owner in ep
group G computes e for every token of G, so the reverse all-to-all brings it
sum_{r in G} dL_r/dtheta_e. The experts therefore skip the dp averaging: an owner's gradient is
summed over the owners of e in the dp/ep ep groups of the dp group ("edp"; nothing when
ep == dp) and divided by dp, which is (1/dp) sum_r dL_r/dtheta_e, the serial gradient.
full_state_dict / full_grads broadcast each expert from its owner; the gradient norm counts it
once; checkpoints save and load each rank's experts (pcompile/checkpoint.py); init_weights
and load_weights refuse ep plans (not supported yet).

FlexMoE's rebalancing (cm.rebalance: backends/expert_rebalance.py) changes who holds which
expert between steps: an expert with m holders in each ep group gets its rows cut into m parts,
one per holder, so the holders together still compute it for every token of their group, and
its gradient is summed over all m * dp/ep holders before the division by dp - the same serial
gradient. The rewritten graph does not change (the placement lives in the backend's routings).

Batched expert weights (Hugging Face Mixtral / Qwen-MoE under torch.export, read as HF's
grouped-mm experts: pcompile.sharding.moe) become one `gated_expert_mixture` node instead,
the stacked weights split along the experts' dim over "ep" (a Shard in param_shardings: each
rank takes its E/ep experts' chunk, full_state_dict gathers it as tensor parallelism's; the
init refusals hold as for the modules form); their gradients are summed over the ranks holding
the same chunk and divided by dp as the modules form's. A rebalancing re-stacks a rank's rows
to the experts its placement gives it (backends/expert_groups.py): the graph does not change.

Under tp > 1 the experts (either form) stay whole on every tp rank, which holds the layer's
tokens whole between attention's row-parallel output and the next block: each tp coordinate's
ep group dispatches the same tokens. With `Strategy.etp` (expert tensor parallelism, modules
form only) each expert is split Megatron-style over the tp group instead: fc's weight and bias
along its output features (Shard dim 0 over "tp"), out's weight along its input features
(dim 1), so tp coordinate t's ep group computes every expert's slice t and the mixture's output
is a partial sum over tp: `tp_reduce` all-reduces it once, after the combine. The tokens and the
gates enter through `tp_copy` (identity forward, gradient all-reduced over tp: each slice gives
a part of dL/dx through fc, and of dL/dgate through its partial output). out's bias is added by
tp coordinate 0 only (backends/expert_groups.py tells the routing), so the sum counts it once;
its gradient, computed there alone, is summed over tp before the step so every tp rank's copy
steps alike. Refused with etp: batched experts, sequence parallelism, pipelines.
Refused with a PcompileError naming the layer: batched experts not read as HF's grouped-mm, a
mixture that is not the gated top-k sum, E not divisible by ep, ep layers under ZeRO-3 / ZeRO-2
or operator split, and different ep degrees in one plan. A checkpointed
ep layer recomputes its dispatch (all-to-alls included) in backward; the mixture node records
its expert parameters' names (node.meta[EXPERT_PARAMS]) for the backend, as inside the
checkpoint region the parameters arrive as inputs.
"""
from __future__ import annotations

import torch.fx as fx

from pcompile.errors import PcompileError
from pcompile.ir import IR, REPLICATED, Placement, Shard
from pcompile.ir.params import under_every_name
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.runtime import collectives, expert_parallel
from pcompile.sharding.moe import MoELayer, find_moe_layers

AXIS = "ep"
TP = "tp"
EXPERT_PARAMS = "pcompile_expert_params"  # node.meta key: the expert parameter names a mixture reads


def _check(layer: str, moe: MoELayer, ep: int, ctx: PassContext) -> None:
    strategy, where = ctx.plan.strategy_for(layer), f"expert parallelism (ep={ep}) in layer {layer!r}"
    if moe.form == "stacked" and moe.gated is None:
        raise PcompileError(
            f"{where}: its experts are batched weights ({', '.join(moe.stacked)}) not read as Hugging Face's "
            "grouped-mm experts (grouped_mm(x, gate_up) -> chunk(2) -> act(gate) * up -> grouped_mm(., down), gated "
            "and summed)", "run this model with ep=1 (dp, tp, ZeRO-3 and pipelines run it exactly)")
    if moe.output is None or moe.indices is None or moe.gates is None or \
            (moe.form == "modules" and moe.combine is None):
        raise PcompileError(f"{where}: its experts' outputs are not combined as the gated top-k mixture "
                            "sum_e scatter(zeros, -1, top-k indices, gates)[..., e:e+1] * expert_e(x)",
                            "write the combine as pcompile.models.MoE does, or use ep=1 for this layer")
    if strategy.etp:
        for why, on in (("its experts are batched weights (expert tensor parallelism splits ModuleList experts only)",
                          moe.form == "stacked"), ("sequence parallelism (sp) in the layer", strategy.sp),
                         ("a pipelined plan", ctx.plan.pp > 1)):
            if on:
                raise PcompileError(f"{where} with expert tensor parallelism (etp): {why} is not supported yet",
                                    "set etp=false: the experts then stay whole on every tp rank")
    if moe.num_experts % ep:
        raise PcompileError(f"{where}: {moe.num_experts} experts do not split over {ep} ranks",
                            f"choose ep among the divisors of {moe.num_experts}")
    if moe.form == "modules" and (len({len(e.params) for e in moe.experts}) != 1
                                  or len(moe.experts[0].params) not in (2, 4)):
        raise PcompileError(f"{where}: its experts do not all have two Linears with (or all without) biases",
                            "give every expert the same two Linears, or use ep=1 for this layer")
    for name, on, fix in (("ZeRO-3", strategy.sdp, "sdp=false"),
                          ("ZeRO-2", strategy.zero2, "zero2=false"),
                          ("operator split", strategy.split > 1, "split=1")):
        if on:
            raise PcompileError(f"{where} with {name} is not supported yet", f"use {fix} with ep, or ep=1")


def _internal(moe: MoELayer) -> list[fx.Node]:
    """The dense mixture's nodes: from the output back to the tokens, indices and gates."""
    stop = {moe.tokens, moe.indices, moe.gates} | ({moe.gated[3]} if moe.gated else set())
    seen, todo = {}, [moe.output]
    while todo:
        node = todo.pop()
        if node in stop or node in seen or node.op in ("placeholder", "output"):
            continue
        seen[node] = None
        todo.extend(node.all_input_nodes)
    return list(seen)


def _tp_splits(moe: MoELayer, tp: int) -> dict[str, Shard]:
    """Expert tensor parallelism: fc (weight, bias) column-, out's weight row-parallel over tp."""
    out = {}
    for expert in moe.experts:
        fc_w, *rest = expert.params
        fc_b, out_w = (rest[0], rest[1]) if len(rest) == 3 else (None, rest[0])
        out.update({fc_w: Shard(TP, 0, tp), out_w: Shard(TP, 1, tp)})
        if fc_b is not None:
            out[fc_b] = Shard(TP, 0, tp)
    return out


def _enter(ir: IR, node: fx.Node, source: fx.Node, tp: int) -> fx.Node:
    """`tp_copy(source)` read by `node` instead of `source` (etp: its gradient summed over tp)."""
    with ir.graph.inserting_before(node):
        copy = ir.graph.call_function(collectives.tp_copy, (source, TP, tp))
    meta, like = ir.meta(copy), ir.meta(source)
    meta.layer, meta.placement = ir.meta(node).layer, REPLICATED
    meta.shape, meta.dtype, meta.output_bytes = like.shape, like.dtype, like.output_bytes
    node.replace_input_with(source, copy)
    return copy


def _rewrite(ir: IR, moe: MoELayer, ep: int, tp_split: int = 1) -> dict[str, Shard]:
    """The mixture node; returns the experts' tp shardings (etp: `tp_split` > 1)."""
    graph, layer = ir.graph, ir.meta(moe.output).layer
    internal = _internal(moe)
    splits = _tp_splits(moe, tp_split) if tp_split > 1 else {}
    if moe.form == "modules":
        params = [name for expert in moe.experts for name in expert.params]
        placement = REPLICATED  # whole experts, each held by one rank of the group (backends/expert_groups.py)
        target, head = expert_parallel.expert_mixture, (moe.tokens, moe.indices, moe.gates, moe.experts[0].activation)
        tail = (len(moe.experts[0].params) == 4,)
    else:  # batched weights: this rank's chunk of the experts along dim 0
        gate_up, down, activation, source = moe.gated
        params, placement = [gate_up, down], Placement.shard(0, AXIS, ep)
        target, head, tail = expert_parallel.gated_expert_mixture, (source, moe.indices, moe.gates, activation), ()
    with graph.inserting_before(moe.output):
        reads = [graph.get_attr(name) for name in params]
        mixture = graph.call_function(target, (*head, AXIS, ep, moe.num_experts, *tail, *reads),
                                      {"tp_split": True} if splits else {})
    mixture.meta[EXPERT_PARAMS] = tuple(params)  # the names, also where a checkpoint region passes them in
    for node, name in zip(reads, params):
        meta, param = ir.meta(node), ir.gm.get_parameter(name)
        meta.layer, meta.placement = layer, placement if name not in splits else \
            Placement.shard(splits[name].dim, TP, tp_split)
        meta.shape, meta.dtype = tuple(param.shape), str(param.dtype)
        meta.output_bytes = param.numel() * param.element_size()
    meta, old = ir.meta(mixture), ir.meta(moe.output)
    meta.layer, meta.placement, meta.shape, meta.dtype, meta.output_bytes = \
        layer, REPLICATED, old.shape, old.dtype, old.output_bytes
    moe.output.replace_all_uses_with(mixture)
    if splits:  # the partial sums over tp all-reduced once; tokens and gates enter the split region
        with graph.inserting_after(mixture):
            reduced = graph.call_function(collectives.tp_reduce, (mixture, TP, tp_split))
        mixture.replace_all_uses_with(reduced)
        reduced.args = (mixture, TP, tp_split)
        rmeta = ir.meta(reduced)
        rmeta.layer, rmeta.placement, rmeta.shape, rmeta.dtype, rmeta.output_bytes = \
            layer, REPLICATED, old.shape, old.dtype, old.output_bytes
        meta.placement = Placement.partial_sum(TP, tp_split)
        for source in (head[0], head[2]):
            _enter(ir, mixture, source, tp_split)
    erased = []
    for node in reversed([n for n in graph.nodes if n in set(internal)]):
        if not node.users:  # the dense mixture's own nodes (the router and probabilities stay: the top-k reads them)
            erased.append(ir.meta(node) if ir.has_meta(node) else None)
            graph.erase_node(node)
    # each token runs top_k of the E experts the dense form ran (a 1/tp slice of each under etp)
    share = moe.top_k / moe.num_experts / tp_split
    for attr in ("flops", "bwd_flops", "saved_bytes"):
        total = sum(getattr(m, attr) or 0 for m in erased if m is not None)
        setattr(meta, attr, type(getattr(old, attr) or 0)(share * total))
    return splits


@register_pass("expert_parallel", kind="rewrite", requires=("plan", "loss_normalised"), ensures=("expert_parallel",))
def expert_parallel_pass(ir: IR, ctx: PassContext) -> IR:
    """Experts of the ep > 1 layers' MoE sharded over ep ranks: all-to-all dispatch and combine."""
    degrees = {layer: ctx.plan.strategy_for(layer).ep for layer in ir.layers}
    for layer in ir.layers:  # (checked here: the cost model prices variants of a strategy with ep=1)
        strategy = ctx.plan.strategy_for(layer)
        if strategy.etp and (strategy.ep == 1 or strategy.tp == 1):
            raise PcompileError(f"layer {layer!r}: expert tensor parallelism (etp) splits the experts held under "
                                f"expert parallelism over the tp group and needs ep > 1 and tp > 1 "
                                f"(ep={strategy.ep}, tp={strategy.tp})", "set etp=false, or ep >= 2 and tp >= 2")
    wanted = {d for d in degrees.values() if d > 1}
    if not wanted:
        return ir
    if len(wanted) > 1:
        raise PcompileError(f"the plan uses different ep degrees ({sorted(wanted)}); one ep group size per plan "
                            "is supported", "give every layer with ep > 1 the same ep")
    found = [(moe.layer, moe) for moe in find_moe_layers(ir) if degrees.get(moe.layer, 1) > 1]
    if not found:
        raise PcompileError(f"the plan asks for expert parallelism (ep={wanted.pop()}) but no layer it names has a "
                            "mixture of experts (a router Linear, softmax, top-k and experts)",
                            "use ep=1, or plan a model with MoE layers (e.g. pcompile.models.MoEGPT)")
    for layer, moe in found:
        _check(layer, moe, degrees[layer], ctx)
    shardings = dict(ir.param_shardings)
    for layer, moe in found:
        strategy = ctx.plan.strategy_for(layer)
        shardings.update(_rewrite(ir, moe, degrees[layer], strategy.tp if strategy.etp else 1))
        if moe.form == "stacked":
            shardings.update({name: Shard(AXIS, 0, degrees[layer]) for name in moe.gated[:2]})
    ir = ir.replace(param_shardings=under_every_name(ir.gm, shardings))
    ir.graph.lint()
    ir.gm.recompile()
    ctx.report.append(f"expert parallel: {len(found)} MoE layers, {found[0][1].num_experts} experts each over "
                      f"ep={degrees[found[0][0]]} ranks (all-to-all dispatch, dropless; the plan's estimate prices "
                      "them so: pcompile.cost.moe)")
    return ir
