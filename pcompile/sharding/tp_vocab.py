"""Vocab parallelism, planning side (pure helpers, no graph changes): which embeddings split
their table along the vocabulary, and whether every reader of a shared weight (a GPT's
embedding tied to its LM head) wants the same split.

An embedding of a tp>1 layer splits its [V, H] table along dim 0 when tp divides V and it has
none of max_norm / scale_grad_by_freq / sparse. The LM head needs no rule of its own: it is a
column-parallel Linear like any other, its logits split along the vocabulary, and the
cross-entropy rule in tp_rules accepts logits split along the class dim.

A parameter is one tensor whatever its names (tied weights have several), so every node that
reads it must agree on its sharding: an embedding wants (dim 0, tp), a column Linear (its
output dim, tp), a row Linear (its input dim, tp), anything else the whole tensor. When they
disagree the embeddings stay replicated and the column Linears are dropped (propagation runs
again without them): correct, only less split.
"""
from __future__ import annotations

import torch.fx as fx

from pcompile.ir import IR, reads_inputs
from pcompile.ir.params import aliases
from pcompile.sharding.tp_ops import OpKinds, embedding_parts, linear_parts


def vocab_embeddings(ir: IR, layer_degree: dict[str, int],
                     kinds: OpKinds | None = None) -> tuple[dict[fx.Node, int], list[str]]:
    """Embeddings of tp>1 layers that can split along the vocabulary -> tp; and a note for each
    one that cannot, saying why. Tables indexed by computed positions (not the inputs) stay
    whole, as in Megatron: they are small, and splitting one would cost an all-reduce."""
    chosen, notes = {}, []
    kinds = kinds or OpKinds(ir.gm)
    for node in ir.graph.nodes:
        degree = layer_degree.get(ir.meta(node).layer, 1) if ir.has_meta(node) else 1
        if degree == 1 or kinds.kind(node) != "embedding":
            continue
        parts = embedding_parts(ir.gm, node)
        # token ids, not ranges built from sizes (positions): shape queries are not followed
        if not reads_inputs(parts.ids, lambda n: ir.has_meta(n) and ir.meta(n).shape is not None):
            continue
        vocab = ir.gm.get_parameter(parts.weight).shape[0]
        if parts.unsupported:
            notes.append(f"embedding {node.name} kept replicated: {parts.unsupported}")
        elif vocab % degree:
            notes.append(f"embedding {node.name} kept replicated: its {vocab} rows (the vocabulary) are not "
                         f"divisible by tp={degree}")
        else:
            chosen[node] = degree
    return chosen, notes


def _readers(ir: IR) -> dict[str, list[tuple[fx.Node, str]]]:
    """First name of each parameter -> (node, the name it reads the parameter by) for every reader."""
    names = aliases(ir.gm)
    readers: dict[str, list[tuple[fx.Node, str]]] = {}
    for node in ir.graph.nodes:
        if node.op == "call_module":
            for local, _ in ir.gm.get_submodule(node.target).named_parameters(remove_duplicate=False):
                name = f"{node.target}.{local}"
                readers.setdefault(names[name][0], []).append((node, name))
        elif node.op == "get_attr" and node.target in names:
            for user in node.users:
                readers.setdefault(names[node.target][0], []).append((user, node.target))
    return readers


def _wanted(ir: IR, p, embeddings: dict[fx.Node, int], node: fx.Node, name: str):
    """(dim, tp) the reader `node` needs the parameter `name` split by, or None (whole)."""
    if node in embeddings:
        return 0, embeddings[node]
    parts = linear_parts(ir.gm, node)
    if parts is not None and parts.weight == name:
        if node in p.column:
            return parts.out_dim, p.degree[node]
        if node in p.row:
            return 1 - parts.out_dim, p.degree[parts.input]
    if parts is not None and parts.bias == name and node in p.column:
        return 0, p.degree[node]
    return None


def disagreements(ir: IR, p, embeddings: dict[fx.Node, int]) -> tuple[set[fx.Node], set[fx.Node], list[str]]:
    """Shared parameters whose readers want different splits, among those an embedding reads:
    (embeddings to keep replicated, column Linears to drop, notes)."""
    emb_names = {embedding_parts(ir.gm, n).weight for n in embeddings}
    names = aliases(ir.gm)
    shared = {names[n][0] for n in emb_names}
    drop_emb, drop_col, notes = set(), set(), []
    for first, readers in _readers(ir).items():
        if first not in shared:
            continue
        wants = {_wanted(ir, p, embeddings, node, name) for node, name in readers}
        if len(wants) == 1 and None not in wants:
            continue
        drop_emb |= {node for node, _ in readers if node in embeddings}
        drop_col |= {node for node, _ in readers if node in p.column}
        notes.append(f"{first} kept whole: it is read by {', '.join(sorted({n.name for n, _ in readers}))}, "
                     "which do not all split it along the vocabulary with the same tp")
    return drop_emb, drop_col, notes
