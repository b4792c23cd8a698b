"""Analysis: per-node and per-layer FLOPs, bytes and activation memory as sympy polynomials in
the batch size b and the sequence length s, derived from the one traced graph.

How: the fake-tensor analyses (shapes, flops, memory) are re-run on the same graph at a grid
of (b, s) points, 3 values of each (degree <= 2 in each: attention is b * s^2), and every
node's figures are interpolated exactly (rational arithmetic) by the polynomial through the
grid. Each formula is then checked on one extra point off the grid; a node whose figures are
not such a polynomial gets no formula and a note in ctx.report. The node's real metadata is
restored afterwards.

Which input dims are b and s: b is dim 0 of every tensor input; s is dim 1 of the integer
(token) inputs of rank >= 2 with a common size; CompileOptions.symbolic_dims ((("b", ((input,
dim), ...)), ("s", ...))) overrides both. Results: NodeMeta.formulas = {quantity: expr} per
node; `layer_formulas(ir)` sums them per layer.
"""
from __future__ import annotations

import dataclasses
import itertools
from fractions import Fraction

import sympy
import torch

from pcompile.errors import PcompileError
from pcompile.ir import IR, META_KEY, NodeMeta
from pcompile.ir.pass_manager import PassContext, get_pass, register_pass

QUANTITIES = ("flops", "bwd_flops", "output_bytes", "saved_bytes")
LAYER_NAMES = {"flops": "flops", "bwd_flops": "bwd_flops", "output_bytes": "bytes", "saved_bytes": "activation"}
b, s = sympy.symbols("b s", positive=True, integer=True)


def symbolic_dims(ctx: PassContext) -> dict[str, list[tuple[int, int]]]:
    """{"b": [(input index, dim)], "s": [...]} (see the module docstring)."""
    if ctx.options.symbolic_dims:
        return {name: list(places) for name, places in ctx.options.symbolic_dims}
    tensors = [(i, x) for i, x in enumerate(ctx.example_inputs) if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not tensors:
        raise PcompileError("symbolic analysis needs at least one tensor input with a batch dim",
                            "pass example_inputs with the batch as dim 0")
    batch = tensors[0][1].shape[0]
    dims = {"b": [(i, 0) for i, x in tensors if x.shape[0] == batch]}
    tokens = [(i, x) for i, x in tensors if x.dim() >= 2 and not x.dtype.is_floating_point]
    if tokens and len({x.shape[1] for _, x in tokens}) == 1 and tokens[0][1].shape[1] >= 4:
        dims["s"] = [(i, 1) for i, _ in tokens]
    return dims


def _inputs_at(ctx: PassContext, dims, point: dict[str, int]) -> tuple:
    shapes = {i: list(x.shape) for i, x in enumerate(ctx.example_inputs) if isinstance(x, torch.Tensor)}
    for name, places in dims.items():
        for i, d in places:
            shapes[i][d] = point[name]
    return tuple(torch.zeros(shapes[i], dtype=x.dtype, device="meta") if i in shapes else x
                 for i, x in enumerate(ctx.example_inputs))


def _grid(ctx: PassContext, dims) -> tuple[list[dict[str, int]], dict[str, int]]:
    """Interpolation points (3 values per dim) and one check point off the grid."""
    base = {name: int(ctx.example_inputs[places[0][0]].shape[places[0][1]]) for name, places in dims.items()}
    values = {"b": [base["b"], 2 * base["b"], 3 * base["b"]]}
    check = {"b": 4 * base["b"] + 1}
    if "s" in base:  # a sequence may not grow past the model's maximum (position embeddings)
        values["s"] = [base["s"], base["s"] // 2, base["s"] // 4]
        check["s"] = (3 * base["s"]) // 4 + (1 if (3 * base["s"]) // 4 in values["s"] else 0)
    names = sorted(values)
    return [dict(zip(names, combo)) for combo in itertools.product(*(values[n] for n in names))], check


def _monomials(names) -> list[tuple[int, ...]]:
    return list(itertools.product(range(3), repeat=len(names)))


def _measure(ir: IR, ctx: PassContext, inputs: tuple) -> dict:
    """Node -> (flops, bwd_flops, output_bytes, saved_bytes) of the analyses at these inputs
    (the shapes, flops and memory passes, run again on the same graph)."""
    originals = {node: node.meta.get(META_KEY) for node in ir.graph.nodes}
    try:
        for node, meta in originals.items():
            node.meta[META_KEY] = NodeMeta(layer=meta.layer if meta else None)
        point_ctx = dataclasses.replace(ctx, example_inputs=inputs, report=[])
        for analysis in ("shapes", "flops", "memory"):
            get_pass(analysis).fn(ir, point_ctx)
        return {node: tuple(getattr(ir.meta(node), q) for q in QUANTITIES) for node in ir.graph.nodes}
    finally:
        for node, meta in originals.items():
            if meta is None:
                node.meta.pop(META_KEY, None)
            else:
                node.meta[META_KEY] = meta


def _inverse(points, names, monomials) -> list[list[Fraction]]:
    matrix = sympy.Matrix([[sympy.prod([sympy.Integer(p[n]) ** e for n, e in zip(names, mono)])
                            for mono in monomials] for p in points])
    return [[Fraction(int(x.p), int(x.q)) for x in row] for row in matrix.inv().tolist()]


@register_pass("symbolic", kind="analysis", requires=("layers",), ensures=("symbolic",))
def symbolic(ir: IR, ctx: PassContext) -> IR:
    """FLOPs, bytes and activation memory per node and layer as polynomials in b and s."""
    dims = symbolic_dims(ctx)
    points, check = _grid(ctx, dims)
    names = sorted(points[0])
    monomials = _monomials(names)
    inverse = _inverse(points, names, monomials)
    samples = [_measure(ir, ctx, _inputs_at(ctx, dims, p)) for p in points]
    checked = _measure(ir, ctx, _inputs_at(ctx, dims, check))
    symbols = {"b": b, "s": s}
    terms = [sympy.prod([symbols[n] ** e for n, e in zip(names, mono)]) for mono in monomials]
    failed = []
    for node in ir.graph.nodes:
        formulas = {}
        for q, quantity in enumerate(QUANTITIES):
            ys = [sample[node][q] for sample in samples]
            coeffs = [sum(row[k] * ys[k] for k in range(len(ys))) for row in inverse]
            expr = sympy.expand(sum(sympy.Rational(c.numerator, c.denominator) * t for c, t in zip(coeffs, terms)))
            if expr.subs({symbols[n]: check[n] for n in names}) != checked[node][q]:
                failed.append(f"{node.name}.{quantity}")
                expr = None
            formulas[quantity] = expr
        ir.meta(node).formulas = formulas
    if failed:
        ctx.report.append(f"symbolic: no polynomial in {names} of degree <= 2 fits {', '.join(failed[:5])}"
                          + (f" and {len(failed) - 5} more" if len(failed) > 5 else ""))
    return ir


def layer_formulas(ir: IR) -> dict[str, dict[str, sympy.Expr | None]]:
    """Per layer, the sum of its nodes' formulas (None where a node has none)."""
    out: dict[str, dict[str, sympy.Expr | None]] = {}
    for layer in ir.layers:
        sums: dict[str, sympy.Expr | None] = {LAYER_NAMES[q]: sympy.Integer(0) for q in QUANTITIES}
        for node in ir.nodes_of(layer):
            formulas = ir.meta(node).formulas or {}
            for q in QUANTITIES:
                key = LAYER_NAMES[q]
                sums[key] = None if sums[key] is None or formulas.get(q) is None else sums[key] + formulas[q]
        out[layer] = sums
    return out


def evaluate(expr: sympy.Expr, batch: int, seq: int | None = None) -> int:
    """A formula's value for a micro-batch of `batch` samples (of length `seq`)."""
    values = {b: batch} if seq is None else {b: batch, s: seq}
    return int(expr.subs(values))
