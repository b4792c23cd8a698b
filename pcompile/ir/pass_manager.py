"""Named passes with declared contracts, a pass manager that checks them, and the debug dump.

A pass is `fn(ir, ctx) -> ir`, registered under a name with what it `requires` and `ensures`:
facts about the IR such as "annotated" (every node has shapes), "layers", "plan" or
"tensor_parallel" (its rewrite ran). Building a PassManager checks that every pass's
requirements are ensured by an earlier pass of the pipeline, so a misordered pipeline fails
before anything runs, naming the pass and the missing fact (torch.fx's PassBase requires /
ensures). A fact may have an invariant, a check of the IR; from the pass that ensures it on,
the manager runs the check after every pass and fails fast naming the pass that broke it (the
xDSL verifier habit). Checks that run the graph (`expensive`) run after passes that changed it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from pcompile.cluster import Cluster
from pcompile.errors import PcompileError
from pcompile.ir.graph import IR, META_KEY, target_name
from pcompile.options import CompileOptions
from pcompile.plan import Plan


@dataclass
class PassContext:
    """What every pass may read: the user's inputs and the options of this compile; `plan` and
    `search_result` are written by the search pass, `report` by any pass."""

    model: torch.nn.Module
    cluster: Cluster
    example_inputs: tuple
    options: CompileOptions = CompileOptions()
    fingerprint: str = ""  # the model's architecture (pcompile.api.fingerprint)
    plan: Plan | None = None  # forced by the user, or written by the search pass
    search_result: object = None  # pcompile.search.result.SearchResult of a searched plan
    report: list[str] = field(default_factory=list)  # human notes passes leave for the user


PassFn = Callable[[IR, PassContext], IR]


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: PassFn
    kind: str  # "frontend", "analysis", "search", "check", "rewrite"
    requires: tuple[str, ...]
    ensures: tuple[str, ...]
    doc: str


@dataclass(frozen=True)
class Invariant:
    check: Callable[[IR, PassContext], str | None]  # a problem, or None
    expensive: bool = False  # runs the graph: checked only after passes that changed it


_REGISTRY: dict[str, PassInfo] = {}
INVARIANTS: dict[str, Invariant] = {}


def register_pass(name: str, kind: str, requires: tuple[str, ...] = (), ensures: tuple[str, ...] = ()):
    def wrap(fn: PassFn) -> PassFn:
        _REGISTRY[name] = PassInfo(name, fn, kind, tuple(requires), tuple(ensures),
                                   (fn.__doc__ or "").strip().splitlines()[0])
        return fn
    return wrap


def register_invariant(fact: str, check: Callable[[IR, PassContext], str | None], expensive: bool = False) -> None:
    """The check that holds once a pass ensured `fact`, after every later pass."""
    INVARIANTS[fact] = Invariant(check, expensive)


def get_pass(name: str) -> PassInfo:
    if name not in _REGISTRY:
        raise PcompileError(f"unknown pass {name!r}", f"registered passes: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


# -- invariants ----------------------------------------------------------------------------
def _every_node_annotated(ir: IR, ctx: PassContext) -> str | None:
    for node in ir.graph.nodes:
        if META_KEY not in node.meta:
            return f"node {node.name} ({node.op} {node.target}) has no pcompile metadata"
    return None


def _every_node_has_layer(ir: IR, ctx: PassContext) -> str | None:
    for node in ir.graph.nodes:
        if META_KEY not in node.meta or node.meta[META_KEY].layer is None:
            return f"node {node.name} belongs to no layer"
        if node.meta[META_KEY].layer not in ir.layers:
            return f"node {node.name} names unknown layer {node.meta[META_KEY].layer!r}"
    return None


register_invariant("annotated", _every_node_annotated)
register_invariant("layers", _every_node_has_layer)


def verify(ir: IR, ctx: PassContext, established: set[str], changed: bool) -> str | None:
    try:
        ir.graph.lint()
    except Exception as exc:  # fx's lint raises RuntimeError with the broken node
        return f"graph lint: {exc}"
    for fact in sorted(established):
        invariant = INVARIANTS.get(fact)
        if invariant is not None and (changed or not invariant.expensive):
            problem = invariant.check(ir, ctx)
            if problem:
                return problem
    return None


def check_order(passes: list[PassInfo]) -> None:
    """Every pass's requirements ensured by an earlier pass (fails naming the first that is not)."""
    ensured: set[str] = set()
    for info in passes:
        missing = [fact for fact in info.requires if fact not in ensured]
        if missing:
            raise PcompileError(f"pass {info.name!r} requires {missing}, which no earlier pass of the pipeline "
                                f"ensures (pipeline: {[p.name for p in passes]})",
                                "run the passes that ensure them first (pcompile.api.PIPELINE is in order)")
        ensured |= set(info.ensures)


# -- the manager ---------------------------------------------------------------------------
class PassManager:
    def __init__(self, names: list[str], verify_each: bool = True, debug_dir: str | os.PathLike | None = None,
                 stop_after: str | None = None):
        self.passes = [get_pass(n) for n in names]
        if stop_after is not None and stop_after not in names:
            raise PcompileError(f"stop_after={stop_after!r} is not in the pipeline", f"use one of {names}")
        check_order(self.passes)
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
            established |= set(info.ensures)
            counts = ir.op_counts()
            if self.verify_each:
                problem = verify(ir, ctx, established, counts != before_counts)
                if problem:
                    raise PcompileError(f"internal error: invariant broken after pass {info.name!r}: {problem}",
                                        "this is a pcompile bug; rerun with debug_dir=... and report the dump")
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
    """The graph as Graphviz DOT: one box per node (name, op, shape, layer, placement), data edges."""
    lines = ["digraph pcompile {", "  node [shape=box, fontname=monospace, fontsize=9];"]
    for node in ir.graph.nodes:
        meta = node.meta.get(META_KEY)
        detail = ""
        if meta is not None:
            shape = "" if meta.shape is None else "[" + ",".join(map(str, meta.shape)) + "]"
            placement = "" if meta.placement is None else str(meta.placement)
            detail = f"\\n{shape} {meta.layer or ''} {placement}".rstrip()
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
