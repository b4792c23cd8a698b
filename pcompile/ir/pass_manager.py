"""Named passes, a pass manager that verifies invariants after every pass, and the debug dump.

A pass is `fn(ir, ctx) -> ir`, registered under a name, so a pipeline is a list of names.
A pass may declare invariants it *establishes* (e.g. "shapes": every node has a shape);
from then on the manager checks them after every later pass and fails fast naming the
pass that broke one (the xDSL verifier / fx PassManager habit).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from pcompile.cluster import Cluster
from pcompile.errors import PcompileError
from pcompile.ir import IR, META_KEY, target_name
from pcompile.plan import Plan


@dataclass
class PassContext:
    """What every pass may read: the user's inputs and the options of this compile."""

    model: torch.nn.Module
    cluster: Cluster
    example_inputs: tuple
    plan: Plan | None = None  # forced by the user, or written by the search pass
    capture: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    report: list[str] = field(default_factory=list)  # human notes passes leave for the user


PassFn = Callable[[IR, PassContext], IR]


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: PassFn
    kind: str  # "frontend", "analysis", "search", "rewrite"
    establishes: tuple[str, ...]
    doc: str


_REGISTRY: dict[str, PassInfo] = {}


def register_pass(name: str, kind: str, establishes: tuple[str, ...] = ()):
    def wrap(fn: PassFn) -> PassFn:
        _REGISTRY[name] = PassInfo(name, fn, kind, establishes, (fn.__doc__ or "").strip().splitlines()[0])
        return fn
    return wrap


def get_pass(name: str) -> PassInfo:
    import pcompile.passes  # noqa: F401  (registers the passes)

    if name not in _REGISTRY:
        raise PcompileError(f"unknown pass {name!r}", f"registered passes: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


# -- invariants ----------------------------------------------------------------------------
def _every_node_annotated(ir: IR) -> str | None:
    for node in ir.graph.nodes:
        if META_KEY not in node.meta:
            return f"node {node.name} ({node.op} {node.target}) has no pcompile metadata"
    return None


def _every_node_has_layer(ir: IR) -> str | None:
    for node in ir.graph.nodes:
        if META_KEY not in node.meta or node.meta[META_KEY].layer is None:
            return f"node {node.name} belongs to no layer"
        if node.meta[META_KEY].layer not in ir.layers:
            return f"node {node.name} names unknown layer {node.meta[META_KEY].layer!r}"
    return None


INVARIANTS: dict[str, Callable[[IR], str | None]] = {
    "annotated": _every_node_annotated,
    "layers": _every_node_has_layer,
}


def verify(ir: IR, established: set[str]) -> str | None:
    try:
        ir.graph.lint()
    except Exception as exc:  # fx's lint raises RuntimeError with the broken node
        return f"graph lint: {exc}"
    for name in sorted(established):
        problem = INVARIANTS[name](ir)
        if problem:
            return problem
    return None


# -- the manager ---------------------------------------------------------------------------
class PassManager:
    def __init__(self, names: list[str], verify_each: bool = True, debug_dir: str | os.PathLike | None = None,
                 stop_after: str | None = None):
        self.passes = [get_pass(n) for n in names]
        if stop_after is not None and stop_after not in names:
            raise PcompileError(f"stop_after={stop_after!r} is not in the pipeline", f"use one of {names}")
        self.verify_each = verify_each
        self.debug_dir = debug_dir
        self.stop_after = stop_after
        self.timings: list[tuple[str, float]] = []

    def run(self, ir: IR | None, ctx: PassContext) -> IR:
        established: set[str] = set()
        index_lines = ["# passes", "", "| # | pass | kind | seconds | nodes | change |", "|---|---|---|---|---|---|"]
        before_counts: dict[str, int] = {}
        for index, info in enumerate(self.passes):
            start = time.perf_counter()
            ir = info.fn(ir, ctx)
            elapsed = time.perf_counter() - start
            self.timings.append((info.name, elapsed))
            established |= set(info.establishes)
            if self.verify_each:
                problem = verify(ir, established)
                if problem:
                    raise PcompileError(f"internal error: invariant broken after pass {info.name!r}: {problem}",
                                        "this is a pcompile bug; rerun with debug_dir=... and report the dump")
            counts = ir.op_counts()
            if self.debug_dir is not None:
                change = _count_diff(before_counts, counts)
                _dump(self.debug_dir, index, info, ir, elapsed, change)
                index_lines.append(f"| {index:02d} | {info.name} | {info.kind} | {elapsed:.3f} | "
                                   f"{len(ir.graph.nodes)} | {change or 'annotated only'} |")
            before_counts = counts
            if info.name == self.stop_after:
                break
        if self.debug_dir is not None:
            with open(os.path.join(self.debug_dir, "passes.md"), "w") as f:
                f.write("\n".join(index_lines) + "\n")
        return ir


def _count_diff(before: dict[str, int], after: dict[str, int]) -> str:
    parts = []
    for key in sorted(set(before) | set(after)):
        delta = after.get(key, 0) - before.get(key, 0)
        if delta:
            parts.append(f"{delta:+d} {key}")
    return ", ".join(parts)


def _dump(debug_dir, index: int, info: PassInfo, ir: IR, elapsed: float, change: str) -> None:
    os.makedirs(debug_dir, exist_ok=True)
    path = os.path.join(debug_dir, f"{index:02d}-{info.name}.txt")
    with open(path, "w") as f:
        f.write(f"# after pass {info.name!r} ({info.kind}): {info.doc}\n")
        f.write(f"# {elapsed:.3f} s, {len(ir.graph.nodes)} nodes; op count change: {change or 'none'}\n\n")
        f.write(ir.format() + "\n\n")
        f.write(ir.gm.code if isinstance(ir.gm, fx.GraphModule) else "")
    _render(ir, os.path.join(debug_dir, f"{index:02d}-{info.name}"))


def dot_text(ir: IR) -> str:
    """The graph as Graphviz DOT: one box per node (name, op, shape, layer, sharding), data edges."""
    lines = ["digraph pcompile {", "  node [shape=box, fontname=monospace, fontsize=9];"]
    for node in ir.graph.nodes:
        meta = node.meta.get(META_KEY)
        detail = ""
        if meta is not None:
            shape = "" if meta.shape is None else "[" + ",".join(map(str, meta.shape)) + "]"
            detail = f"\\n{shape} {meta.layer or ''} {meta.sharding or ''}".rstrip()
        label = f"{node.name}\\n{node.op} {target_name(node)}{detail}".replace('"', "'")
        lines.append(f'  "{node.name}" [label="{label}"];')
        for source in node.all_input_nodes:
            lines.append(f'  "{source.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _render(ir: IR, stem: str) -> None:
    """fx's graph drawer (SVG) when pydot is installed, else DOT text for any Graphviz viewer."""
    try:
        from torch.fx.passes.graph_drawer import FxGraphDrawer

        svg = FxGraphDrawer(ir.gm, os.path.basename(stem)).get_dot_graph().create_svg()
        with open(stem + ".svg", "wb") as f:
            f.write(svg)
    except Exception:  # no pydot / no graphviz binary: the DOT text is the rendering
        with open(stem + ".dot", "w") as f:
            f.write(dot_text(ir))
