"""Sharding propagation for tensor parallelism (pure helpers, no graph changes).

Given the Linear nodes chosen as *column-parallel* (output features split over the tp group),
walk the graph in order and work out, for every tensor, whether it is replicated (None) or
split along one dim. A Linear fed a tensor split along its last dim is *row-parallel*: its
partial sums are all-reduced. Ops in between follow shape rules (elementwise, view/reshape,
transpose, softmax off the split dim, attention and batched matmul over a split head dim,
a cross-entropy of logits split along the classes: the vocab-parallel LM head, a split of a
fused projection's output into equal q/k/v blocks: tp_fused).

An op that cannot take a split input means the column Linears that produced it must stay
replicated: `plan_tensor_parallel` drops them and propagates again, until a fixed point. The
result is Megatron's pairing found from the graph rather than written per model.

The rules read both IRs: fx captures (call_module Linear, F.linear, tensor methods) and
torch.export captures (aten.linear, aten.addmm of GPT-2's Conv1D with its [in, out] weight,
aten.view / expand / unsqueeze / slice / cat / split, aten.scaled_dot_product_attention).
Attention whose k/v heads cannot be split (grouped-query attention with fewer kv heads than
tp) keeps k/v replicated and slices the expanded heads at the attention (`scatters`); an
attention bias that varies per head (T5's relative position bias) is sliced the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from pcompile.ir import IR
from pcompile.ir.params import attribute
from pcompile.sharding.tp_fused import equal_blocks, only_layout_from
from pcompile.sharding.tp_ops import (
    LinearParts,
    OpKinds,
    kind_of,
    linear_parts,
    loss_parts,
    view_groups,
    view_split_dim,
)
from pcompile.sharding.tp_vocab import disagreements, vocab_embeddings

__all__ = ["LinearParts", "Propagation", "linear_parts", "plan_tensor_parallel", "propagate", "tp_problem",
           "view_groups", "view_split_dim"]


@dataclass
class Propagation:
    degree: dict[fx.Node, int]  # tp degree of every split tensor
    split_dim: dict[fx.Node, int]  # split tensors only; absent = replicated
    origins: dict[fx.Node, frozenset]  # column Linears a split tensor comes from
    column: set[fx.Node] = field(default_factory=set)
    row: set[fx.Node] = field(default_factory=set)
    view_dims: dict[fx.Node, int] = field(default_factory=dict)  # view node -> output dim whose size divides
    size_nodes: dict[fx.Node, int] = field(default_factory=dict)  # shape/size query on a split tensor
    scatters: list[tuple[fx.Node, fx.Node, int]] = field(default_factory=list)  # (user, replicated input, dim)
    # (user, replicated input) broadcast along the user's split dim and carrying a gradient: that
    # gradient is a sum over the split dim, partial on each rank (a router's gate scaling split
    # expert outputs) - tp_copy (all-reduce backward) before the user
    broadcasts: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)
    grad_nodes: set[fx.Node] | None = None  # the nodes that carry a gradient (carries_grad)
    failure: tuple[fx.Node, str, frozenset] | None = None
    losses: dict[fx.Node, int] = field(default_factory=dict)  # cross-entropy of vocab-split logits -> tp
    embeddings: dict[fx.Node, int] = field(default_factory=dict)  # embedding split along the vocabulary -> tp
    notes: list[str] = field(default_factory=list)  # what stayed whole for vocab parallelism, and why
    partly: dict[str, str] = field(default_factory=dict)  # layer split in part -> why the rest stays whole
    split_sizes: dict[fx.Node, tuple[fx.Node, int]] = field(default_factory=dict)  # split of a fused
    # projection's output (tp_fused) -> (its column Linear, the number of equal blocks): sizes divide by tp

    @property
    def fused(self) -> dict[fx.Node, int]:
        """Column Linear -> the equal blocks its weight is split by (Shard.blocks)."""
        return dict(self.split_sizes.values())


def _ndim(ir: IR, node) -> int:
    return len(ir.meta(node).shape) if isinstance(node, fx.Node) and ir.meta(node).shape is not None else 0


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _set(ir: IR, p: Propagation, node: fx.Node, dim: int, degree: int, origins: frozenset) -> None:
    p.split_dim[node], p.degree[node], p.origins[node] = dim % max(_ndim(ir, node), 1), degree, origins


def propagate(ir: IR, candidates: dict[fx.Node, int], p: Propagation | None = None, start: int = 0,
              kinds: OpKinds | None = None) -> Propagation:
    """One pass of sharding propagation with `candidates` (Linear -> tp degree) as column-parallel;
    with `p` and `start`, resumes from the graph's node number `start` on `p`'s state."""
    kinds = kinds or OpKinds(ir.gm)
    p = p or Propagation(degree={}, split_dim={}, origins={})
    for node in list(ir.graph.nodes)[start:]:
        ins = [a for a in _tensor_args(node) if a in p.split_dim]
        kind = kinds.kind(node)
        if kind == "linear":
            parts = kinds.linear(node)
            source = parts.input
            if source in p.split_dim:
                if p.split_dim[source] != _ndim(ir, source) - 1:
                    return _fail(p, node, "Linear fed a tensor split along a non-feature dim", source)
                if parts.packed:  # its weight is a piece of a parameter split by rows: not row-parallel
                    return _fail(p, node, "Linear reading a piece of a packed weight fed a split tensor", source)
                p.row.add(node)  # partial sums: reduced right after, output replicated
                continue
            if node in candidates:
                if parts.out_features % candidates[node]:
                    return _fail(p, node, f"Linear with {parts.out_features} output features is not "
                                          f"divisible by tp={candidates[node]}", origins=frozenset({node}))
                p.column.add(node)
                _set(ir, p, node, -1, candidates[node], frozenset({node}))
            continue
        if not ins:
            continue
        degrees = {p.degree[a] for a in ins}
        origins = frozenset().union(*(p.origins[a] for a in ins))
        if len(degrees) > 1:
            return _fail(p, node, "inputs split over groups of different sizes", origins=origins)
        degree = degrees.pop()
        first = node.args[0] if node.args else None
        dim = p.split_dim.get(first) if isinstance(first, fx.Node) else None
        rule = RULES.get(kind)
        if rule is None or (dim is None and kind not in ("binary", "cat")):
            return _fail(p, node, f"{node.op} {getattr(node.target, '__name__', node.target)} cannot take a "
                                  "tensor split across the tp group", origins=origins)
        problem = rule(ir, p, node, dim, degree, origins)
        if isinstance(problem, tuple):  # (why, the split inputs to blame)
            return _fail(p, node, problem[0], origins=frozenset().union(*(p.origins[t] for t in problem[1])))
        if problem:
            return _fail(p, node, problem, origins=origins)
    return _packed_pieces(ir, p)


# -- one rule per op kind: set the output's split (or record a rewrite), or say why not --------
def _unary(ir, p, node, dim, degree, origins):
    _set(ir, p, node, dim, degree, origins)


def _view(ir, p, node, dim, degree, origins):
    out_dim, why = view_split_dim(ir.meta(node.args[0]).shape, ir.meta(node).shape, dim, degree)
    if out_dim is None:
        return why
    p.view_dims[node] = out_dim
    _set(ir, p, node, out_dim, degree, origins)


def _expand(ir, p, node, dim, degree, origins):
    """expand(x, sizes): the split dim keeps its size (-1 or the same); new leading dims shift it."""
    sizes, in_shape = list(node.args[1]), ir.meta(node.args[0]).shape
    out_dim = dim + len(sizes) - len(in_shape)
    if not (isinstance(sizes[out_dim], int) and sizes[out_dim] in (-1, in_shape[dim])):
        return "expand along the split dim"
    p.view_dims[node] = out_dim
    _set(ir, p, node, out_dim, degree, origins)


def _unsqueeze(ir, p, node, dim, degree, origins):
    new = node.args[1] % (_ndim(ir, node.args[0]) + 1)
    _set(ir, p, node, dim if dim < new else dim + 1, degree, origins)


def _slice(ir, p, node, dim, degree, origins):
    n = _ndim(ir, node.args[0])
    along, start, end = _arg(node, 1, "dim", 0) % n, _arg(node, 2, "start", None), _arg(node, 3, "end", None)
    whole = start in (None, 0) and (end is None or (isinstance(end, int) and end >= ir.meta(node.args[0]).shape[dim]))
    if along == dim and not whole:
        return "slice of the split dim (e.g. rotary halves across heads)"
    _set(ir, p, node, dim, degree, origins)


def _select(ir, p, node, dim, degree, origins):
    along = node.args[1] % _ndim(ir, node.args[0])
    if along == dim:
        return "select along the split dim"
    _set(ir, p, node, dim if dim < along else dim - 1, degree, origins)


def _cat(ir, p, node, dim, degree, origins):
    tensors = list(node.args[0])
    dims = {p.split_dim.get(t) for t in tensors}
    along = _arg(node, 1, "dim", 0) % max(_ndim(ir, node), 1)
    if len(dims) != 1 or None in dims:
        return "cat of split and replicated tensors"
    if dims.pop() == along:
        return "cat along the split dim"
    _set(ir, p, node, p.split_dim[tensors[0]], degree, origins)


def _split(ir, p, node, dim, degree, origins):
    """split / chunk: along another dim, each piece keeps the split; along the split dim, a
    fused projection's equal blocks (tp_fused): the Linear is then split block-wise."""
    along = _arg(node, 2, "dim", 0) % _ndim(ir, node.args[0])
    if along == dim:
        blocks = equal_blocks(ir, node, along)
        source = node.args[0]
        if blocks is None or (ir.meta(source).shape[dim] // blocks) % degree:
            return f"split of the split dim into pieces that are not equal blocks divisible by tp={degree}"
        if len(origins) != 1 or not only_layout_from(ir, p.split_dim, source, next(iter(origins))):
            return "split of the split dim of a tensor read elsewhere or reshaped on the way from its Linear"
        p.split_sizes[node] = (next(iter(origins)), blocks)
    _set(ir, p, node, dim, degree, origins)


def _unflatten(ir, p, node, dim, degree, origins):
    """unflatten(x, along, sizes): another dim keeps the split (shifted). The split dim itself
    unflattened into [n, E], E the input features of the Linear it comes from, is a packed
    projection's n equal blocks (torch's F._in_projection_packed: linear(x, in_proj[3E, E])
    .unflatten(-1, (3, E)), then q, k, v selected): split block-wise as tp_fused's split, the
    split landing on E; any other unflatten of it is a view (the split on its first dim)."""
    n_in = _ndim(ir, node.args[0])
    along, sizes = _arg(node, 1, "dim") % n_in, list(_arg(node, 2, "sizes"))
    if dim != along:
        _set(ir, p, node, dim if dim < along else dim + len(sizes) - 1, degree, origins)
        return None
    origin = next(iter(origins)) if len(origins) == 1 else None
    parts = linear_parts(ir.gm, origin) if origin is not None else None
    if (parts is not None and len(sizes) == 2 and sizes[1] == parts.in_features
            and only_layout_from(ir, p.split_dim, node.args[0], origin)):
        if sizes[1] % degree:
            return f"packed projection of {sizes[0]} blocks of {sizes[1]} features, not divisible by tp={degree}"
        p.split_sizes[node] = (origin, sizes[0])
        out_dim = along + 1
    else:
        out_dim, why = view_split_dim(ir.meta(node.args[0]).shape, ir.meta(node).shape, dim, degree)
        if out_dim is None:
            return why
    p.view_dims[node] = out_dim
    _set(ir, p, node, out_dim, degree, origins)
    return None


def _squeeze(ir, p, node, dim, degree, origins):
    shape = ir.meta(node.args[0]).shape
    dims = _arg(node, 1, "dim")
    dims = range(len(shape)) if dims is None else [dims] if isinstance(dims, int) else dims
    removed = {d % len(shape) for d in dims if shape[d % len(shape)] == 1}
    if dim in removed:
        return "squeeze of the split dim"
    _set(ir, p, node, dim - sum(d < dim for d in removed), degree, origins)
    return None


def _packed_pieces(ir: IR, p: Propagation) -> Propagation:
    """A packed weight (nn.MultiheadAttention's in_proj split into q and kv) is one parameter
    with one sharding (its equal blocks, each chunked by tp): every piece must be read by a
    Linear split alike, and a piece of several blocks (kv) must reach a split into exactly those
    blocks (tp_fused), or its local [k_r, v_r] would be read as one contiguous chunk."""
    fused = p.fused
    for node in [n for n in p.column if linear_parts(ir.gm, n).packed]:
        parts = linear_parts(ir.gm, node)
        if fused.get(node, 1) != parts.packed[0]:
            return _fail(p, node, f"a piece of the packed {parts.weight} ({parts.packed[0]} blocks) is not cut "
                                  "into its blocks before use", origins=frozenset({node}))
        readers = {u for split in parts.splits for piece in split.users for u in piece.users}
        alike = {u for u in readers if u in p.column and p.degree[u] == p.degree[node]}
        if readers - alike:
            return _fail(p, node, f"a piece of the packed {parts.weight} is read by "
                                  f"{', '.join(sorted(u.name for u in readers - alike))}, not split alike",
                         origins=frozenset(alike))
    return p


def _getitem(ir, p, node, dim, degree, origins):
    if kind_of(ir.gm, node.args[0]) not in ("split", "chunk"):
        return "indexing a split tensor"
    _set(ir, p, node, dim, degree, origins)


def _transpose(ir, p, node, dim, degree, origins):
    n = _ndim(ir, node.args[0])
    a, b = (x % n for x in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
    _set(ir, p, node, b if dim == a else a if dim == b else dim, degree, origins)


def _permute(ir, p, node, dim, degree, origins):
    order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    order = [d % _ndim(ir, node.args[0]) for d in order]
    _set(ir, p, node, order.index(dim), degree, origins)


def _flatten(ir, p, node, dim, degree, origins):
    first = node.args[0]
    n = _ndim(ir, first)
    start, end = _arg(node, 1, "start_dim", 0) % n, _arg(node, 2, "end_dim", -1) % n
    if dim < start:
        _set(ir, p, node, dim, degree, origins)
    elif dim > end:
        _set(ir, p, node, dim - (end - start), degree, origins)
    elif view_split_dim(ir.meta(first).shape, ir.meta(node).shape, dim, degree)[0] is not None:
        _set(ir, p, node, start, degree, origins)
    else:
        return "flatten moves the split dim inside a merged dim"


def _softmax(ir, p, node, dim, degree, origins):
    soft_dim = _arg(node, 1, "dim")
    if soft_dim is None or soft_dim % _ndim(ir, node.args[0]) == dim:
        return "softmax along the split dim"
    _set(ir, p, node, dim, degree, origins)


def _sdpa(ir, p, node, dim, degree, origins):
    """Heads split: q, k, v split along the same head dim. A replicated k/v (or attention bias)
    holding every head is sliced to this rank's heads (grouped-query kv that tp cannot split,
    T5's per-head position bias); a bias broadcast over heads (size 1) is used as is."""
    q, k, v = node.args[:3]
    n = _ndim(ir, q)
    if dim >= n - 2:
        return "attention with q split along its sequence or feature dim"
    heads = ir.meta(q).shape[dim]
    mask = _arg(node, 3, "attn_mask")
    scatter = []
    for t, role in ((k, "k/v"), (v, "k/v"), (mask, "mask")):
        if not isinstance(t, fx.Node):
            continue
        if t in p.split_dim:
            if p.split_dim[t] + n - _ndim(ir, t) != dim:
                return f"attention with {role} split along another dim than q's heads", [t]
        elif _size_at(ir, t, dim, n) == heads:
            scatter.append(t)
        elif _size_at(ir, t, dim, n) != 1 or role != "mask":
            return f"attention {role} with {_size_at(ir, t, dim, n)} heads against q's {heads}"
    for t in dict.fromkeys(scatter):
        p.scatters.append((node, t, dim - (n - _ndim(ir, t))))
    _set(ir, p, node, dim, degree, origins)


def _matmul(ir, p, node, dim, degree, origins):
    a, b = node.args[:2]
    out_n = _ndim(ir, node)
    aligned = {p.split_dim[t] + out_n - _ndim(ir, t) for t in (a, b) if t in p.split_dim}
    if len(aligned) != 1 or next(iter(aligned)) >= out_n - 2:
        return "matmul over a split contraction dim"
    out_dim = aligned.pop()
    for t in (a, b):
        if t not in p.split_dim and _size_at(ir, t, out_dim, out_n) != 1:
            return "matmul of a split and a replicated batch"
        if t not in p.split_dim and carries_grad(ir, p, t):
            p.broadcasts.append((node, t))
    _set(ir, p, node, out_dim, degree, origins)


def _size(ir, p, node, dim, degree, origins):
    p.size_nodes[node] = dim


def _cross_entropy(ir, p, node, dim, degree, origins):
    """Logits split along the class dim (an LM head split along the vocabulary): the parallel
    cross-entropy (pcompile/runtime/vocab_parallel.py) computes the replicated loss from the shards."""
    parts = loss_parts(ir.gm, node)
    if parts.unsupported:
        return parts.unsupported
    if parts.target in p.split_dim or dim != (1 if _ndim(ir, parts.logits) >= 2 else 0):
        return "cross-entropy of logits split along another dim than the classes"
    if "float" in (ir.meta(parts.target).dtype or ""):
        return "cross-entropy against class probabilities"
    p.losses[node] = degree


def _size_at(ir: IR, node: fx.Node, out_dim: int, out_ndim: int) -> int:
    """Size of `node` at output dim `out_dim` after right-aligned broadcasting (1 if absent)."""
    shape = ir.meta(node).shape or ()
    index = out_dim - (out_ndim - len(shape))
    return 1 if index < 0 else shape[index]


def _binary(ir: IR, p: Propagation, node: fx.Node, dim, degree: int, origins: frozenset) -> str | None:
    out_n = _ndim(ir, node)
    tensors = [a for a in node.args if isinstance(a, fx.Node) and ir.meta(a).shape is not None]
    aligned = {p.split_dim[t] + out_n - _ndim(ir, t) for t in tensors if t in p.split_dim}
    if len(aligned) != 1:
        return "elementwise op on tensors split along different dims"
    out_dim = aligned.pop()
    for t in tensors:
        if t not in p.split_dim and _size_at(ir, t, out_dim, out_n) != 1:
            # A replicated operand is sliced locally (its gradient all-gathered back).
            p.scatters.append((node, t, out_dim - (out_n - _ndim(ir, t))))
        elif t not in p.split_dim and carries_grad(ir, p, t):
            p.broadcasts.append((node, t))
    p.split_dim[node], p.degree[node], p.origins[node] = out_dim, degree, origins
    return None


def carries_grad(ir: IR, p: Propagation, node: fx.Node) -> bool:
    """Whether a gradient flows into `node`: a floating value computed from parameters (found
    for the whole graph on first use, in graph order)."""
    if p.grad_nodes is None:
        found: set[fx.Node] = set()
        for n in ir.graph.nodes:
            dtype = ir.meta(n).dtype if ir.has_meta(n) else None
            if dtype is not None and "float" not in dtype:
                continue
            if n.op == "get_attr" and isinstance(attribute(ir.gm, n.target), torch.nn.Parameter):
                found.add(n)
            elif n.op == "call_module" and any(True for _ in ir.gm.get_submodule(n.target).parameters()):
                found.add(n)
            elif n.op == "call_method" and n.target == "detach":
                continue
            elif any(a in found for a in n.all_input_nodes):
                found.add(n)
        p.grad_nodes = found
    return node in p.grad_nodes


RULES = {"unary": _unary, "binary": _binary, "view": _view, "expand": _expand, "unsqueeze": _unsqueeze,
         "slice": _slice, "select": _select, "cat": _cat, "split": _split, "chunk": _split, "getitem": _getitem,
         "unflatten": _unflatten, "squeeze": _squeeze,
         "transpose": _transpose, "permute": _permute, "flatten": _flatten, "softmax": _softmax, "sdpa": _sdpa,
         "matmul": _matmul, "size": _size, "cross_entropy": _cross_entropy}


def _fail(p: Propagation, node: fx.Node, why: str, source: fx.Node | None = None,
          origins: frozenset | None = None) -> Propagation:
    p.failure = (node, why, origins if origins is not None else p.origins.get(source, frozenset()))
    return p


def _before(p: Propagation, index: dict[fx.Node, int], start: int) -> Propagation:
    """`p`'s facts about the nodes numbered below `start` (scatters are keyed by their user)."""
    def keep(mapping):
        return {n: v for n, v in mapping.items() if index[n] < start}

    return Propagation(keep(p.degree), keep(p.split_dim), keep(p.origins),
                       {n for n in p.column if index[n] < start}, {n for n in p.row if index[n] < start},
                       keep(p.view_dims), keep(p.size_nodes), [s for s in p.scatters if index[s[0]] < start],
                       losses=keep(p.losses), split_sizes=keep(p.split_sizes),
                       broadcasts=[b for b in p.broadcasts if index[b[0]] < start], grad_nodes=p.grad_nodes)


def _feeds_split_work(ir: IR, p: Propagation, origins: list[fx.Node]) -> bool:
    """Whether the Linears left replicated for indivisibility still feed split work through a
    local slice (grouped-query k/v with fewer kv heads than tp: replicated, then each rank
    slices its heads). If not, the degree really does not divide the heads."""
    sources = {source for _, source, _ in p.scatters}
    for origin in origins:
        layer, frontier, seen = ir.meta(origin).layer, [origin], set()
        while frontier:
            node = frontier.pop()
            if node in sources:
                return True
            seen.add(node)
            frontier.extend(u for u in node.users if u not in seen and ir.meta(u).layer == layer)
    return False


NO_LINEAR = "no Linear in the layer"


def opaque_linears(gm: fx.GraphModule, nodes=None) -> list[str]:
    """The calls (`target (Class)`) of modules that hide Linears from the graph: torch.nn modules
    fx keeps as one call_module (nn.MultiheadAttention, nn.TransformerEncoderLayer, ...) that hold
    Linear layers or attention projections - tensor parallelism sees nothing there to split."""
    found = []
    for node in gm.graph.nodes if nodes is None else nodes:
        if node.op != "call_module" or isinstance(module := gm.get_submodule(node.target), torch.nn.Linear):
            continue
        if any(isinstance(m, (torch.nn.Linear, torch.nn.MultiheadAttention)) for m in module.modules()):
            found.append(f"{node.target} ({type(module).__name__})")
    return list(dict.fromkeys(found))


def plan_tensor_parallel(ir: IR, layer_degree: dict[str, int],
                         kinds: OpKinds | None = None) -> tuple[Propagation, dict[str, str]]:
    """Fixed point: start with every Linear of a tp>1 layer as column-parallel, drop the ones
    whose split output reaches an op that cannot take it. Returns the final propagation and,
    per layer left unsplit (or split only partly because tp does not divide a head count or a
    feature size), the reason. Embeddings split along the vocabulary where every reader of
    their table (a tied LM head) splits it the same way (tp_vocab); `p.notes` says what did not.
    `kinds`: the graph's op kinds, shared by callers planning several degrees."""
    kinds = kinds or OpKinds(ir.gm)
    embeddings, notes = vocab_embeddings(ir, layer_degree, kinds)
    dropped: set[fx.Node] = set()
    while True:
        p, reasons = _fixed_point(ir, layer_degree, dropped, kinds)
        drop_emb, drop_col, why = disagreements(ir, p, embeddings)
        if not drop_emb and not drop_col:
            break
        notes += why
        embeddings = {n: d for n, d in embeddings.items() if n not in drop_emb}
        dropped |= drop_col
    p.embeddings, p.notes = embeddings, list(dict.fromkeys(notes))
    for layer in {ir.meta(n).layer for n in embeddings}:
        if reasons.get(layer) == NO_LINEAR:  # split all the same: its embedding
            del reasons[layer]
    return p, reasons


def _fixed_point(ir: IR, layer_degree: dict[str, int], dropped: set[fx.Node],
                 kinds: OpKinds) -> tuple[Propagation, dict[str, str]]:
    candidates = {n: layer_degree[ir.meta(n).layer] for n in ir.graph.nodes
                  if kinds.kind(n) == "linear" and layer_degree.get(ir.meta(n).layer, 1) > 1 and n not in dropped}
    reasons: dict[str, str] = {}
    indivisible: dict[str, str] = {}  # a degree that does not divide heads / features is never "partly fine"
    indivisible_origins: dict[str, list[fx.Node]] = {}
    index = {node: i for i, node in enumerate(ir.graph.nodes)}
    p = propagate(ir, candidates, kinds=kinds)
    while p.failure is not None:
        node, why, origins = p.failure
        if not origins:
            raise AssertionError(f"sharding propagation failed at {node.name} with no column Linear to drop: {why}")
        for origin in origins:
            candidates.pop(origin, None)
            reasons.setdefault(ir.meta(origin).layer, f"{node.name}: {why}")
            if "not divisible by tp" in why:
                indivisible.setdefault(ir.meta(origin).layer, f"{node.name}: {why}")
                indivisible_origins.setdefault(ir.meta(origin).layer, []).append(origin)
        # Nodes before the first dropped Linear do not depend on it: resume there, not from the top
        # (one failure per layer of an 80-layer model would otherwise cost 80 whole-graph passes).
        start = min(index[o] for o in origins)
        p = propagate(ir, candidates, _before(p, index, start), start, kinds)
    for layer, degree in layer_degree.items():
        if degree > 1 and not any(ir.meta(n).layer == layer for n in p.column):
            hidden = opaque_linears(ir.gm, ir.nodes_of(layer))
            reasons.setdefault(layer, NO_LINEAR if not hidden else
                               f"{NO_LINEAR} that torch.fx records: it keeps {', '.join(hidden)} as one call - "
                               "capture with capture='export' (or 'auto'), which traces into its Linears")
        elif layer in indivisible and not _feeds_split_work(ir, p, indivisible_origins[layer]):
            reasons[layer] = indivisible[layer]
        elif layer in reasons and any(ir.meta(n).layer == layer for n in p.column):
            # partly split (e.g. nn.MultiheadAttention with need_weights=True kept whole, its MLP split)
            p.partly[layer] = reasons.pop(layer)
    return p, reasons


def tp_problem(ir: IR, tp: int, planned=None) -> str | None:
    """Why tp cannot split this model's blocks, or None (`planned`: plan_tensor_parallel's answer)."""
    if tp == 1:
        return None
    _, reasons = planned or plan_tensor_parallel(ir, {layer: tp for layer in ir.layers})
    blocks = ir.block_layers or [layer for layer in ir.layers if layer not in ("pre", "post")]
    for layer in blocks:
        if layer in reasons:
            return f"tp={tp} cannot split {layer} ({reasons[layer]})"
    return None
