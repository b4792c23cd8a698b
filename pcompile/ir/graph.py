"""The IR: a torch.fx GraphModule whose nodes carry a typed `NodeMeta` in node.meta["pcompile"].

Graph-level facts live on the `IR` object next to the GraphModule, as typed fields: the
ordered layers, how each parameter is split (tensor parallelism, then ZeRO-3), the mixed
(dp, tp) layout of per-layer groupings and the pipeline cut, each written by the pass that
makes it true. The text form of `IR.format()` is stable (fixed columns, no wrapping) so tests
compare it, and `IR.parse()` reads it back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name

from pcompile.ir.placement import Placement, Shard, local_shape

META_KEY = "pcompile"


@dataclass
class NodeMeta:
    """What the analysis passes know about one node. Bytes and FLOPs are for the full
    (unsharded) example batch; `placement` is set by the rewrite passes."""

    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    value: object = None  # python scalars / shapes computed at trace time (sizes, ints)
    flops: int = 0  # forward FLOPs
    bwd_flops: int = 0
    output_bytes: int = 0
    saved_bytes: int = 0  # activation bytes autograd keeps for backward (parameters excluded)
    param_bytes: int = 0  # parameters this node reads (call_module / get_attr)
    layer: str | None = None
    placement: Placement | None = None  # how the rank's value is cut, once a rewrite assigned it
    formulas: dict | None = None  # {quantity: sympy expr in b, s} (the optional symbolic analysis)


@dataclass(frozen=True)
class MixedLayout:
    """Per-layer (dp, tp) groupings (passes/reshard.py): how the input batch is split, where
    the loss parts are, and the dp axis each parameter's gradient is summed over."""

    input_axis: str
    input_dp: int
    loss_axis: str
    loss_dp: int
    param_axes: dict  # canonical parameter name -> (dp axis, dp degree)


@dataclass(frozen=True)
class LossCounts:
    """The data-dependent denominators of masked-mean losses (passes/normalise_loss.py): `gm`
    computes each one's count over the batch it is given (it takes the model's inputs, as the
    graph does) and the rewritten graph reads the whole step's count i from its placeholder
    `placeholders[i]`. The backend sums the rank's local counts over the ranks that split the
    batch and passes the totals."""

    placeholders: tuple[str, ...]
    gm: fx.GraphModule = field(compare=False, repr=False)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage (passes/pipeline_split.py): its layers, the activations it receives
    and sends, and its graph."""

    index: int
    rank: int  # pp coordinate of the rank that runs it
    layers: tuple[str, ...]
    inputs: tuple[str, ...]  # activations received from the previous stage, in order
    outputs: tuple[str, ...]  # activations sent to the next stage (the loss for the last)
    gm: fx.GraphModule = field(compare=False, repr=False)


@dataclass(frozen=True)
class PipelineSplit:
    pp: int
    stages: tuple[Stage, ...]
    model_inputs: tuple[str, ...]  # placeholder names: keyword arguments of every stage
    canonical: dict[str, str] = field(compare=False)  # every parameter name -> the model's deduplicated name
    tied: tuple[str, ...] = ()  # canonical names of parameters held by stages on more than one pp rank


@dataclass(frozen=True)
class Replicas:
    """Repeated blocks captured and analysed once (pcompile.ir.replicate): `gm` is the capture of
    the model with its first `captured` blocks only (the template), and every node of the IR is
    the copy of `source[node.name]` there (blocks past the template's copy its last block).
    The analyses run on the template and every node takes its source's annotations; `repeats`
    pairs the template's last two blocks node by node: their annotations must be equal for the
    copies to be exact (else the analysis runs on the whole IR)."""

    gm: fx.GraphModule = field(compare=False, repr=False)
    source: dict = field(compare=False, repr=False)  # IR node name -> template node
    repeats: tuple = field(compare=False, repr=False)  # (node of block captured-2, node of block captured-1)
    prefix: str  # the blocks' container (module path)
    blocks: int  # blocks in the model
    captured: int  # blocks in the template


@dataclass
class IR:
    gm: fx.GraphModule
    layers: list[str] = field(default_factory=list)  # ordered: "pre", blocks..., "post"
    block_layers: list[str] = field(default_factory=list)  # the repeated blocks only
    # parameter name (every alias) -> its tensor-parallel split (tensor_parallel)
    param_shardings: dict[str, Shard] = field(default_factory=dict)
    # parameter name (every alias) -> its ZeRO-3 split over dp of the tp shard (sharded_data_parallel)
    sdp_shardings: dict[str, Shard] = field(default_factory=dict)
    mixed_layout: MixedLayout | None = None  # per-layer (dp, tp) groupings (reshard); None: one grouping
    pipeline: PipelineSplit | None = None  # the stages (pipeline_split); None: not pipelined
    loss_counts: LossCounts | None = None  # masked means' step-wide counts (normalise_loss); None: none
    capture: str = "fx"
    replicas: Replicas | None = None  # repeated blocks analysed once (trace); None: every node analysed

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def replace(self, **changes) -> "IR":
        return dataclasses.replace(self, **changes)

    def local_param_shape(self, name: str, shape) -> torch.Size:
        """This rank's shape of parameter `name`: its tp shard, then its ZeRO-3 chunk."""
        return local_shape(shape, self.param_shardings.get(name), self.sdp_shardings.get(name))

    # -- metadata --------------------------------------------------------------------------
    @staticmethod
    def meta(node: fx.Node) -> NodeMeta:
        if META_KEY not in node.meta:
            node.meta[META_KEY] = NodeMeta()
        return node.meta[META_KEY]

    @staticmethod
    def has_meta(node: fx.Node) -> bool:
        return META_KEY in node.meta

    def nodes_of(self, layer: str) -> list[fx.Node]:
        return [n for n in self.graph.nodes if self.has_meta(n) and self.meta(n).layer == layer]

    def total(self, attr: str, layer: str | None = None) -> int:
        return sum(getattr(self.meta(n), attr) for n in self.graph.nodes
                   if self.has_meta(n) and (layer is None or self.meta(n).layer == layer))

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.graph.nodes:
            key = f"{node.op}:{target_name(node)}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    # -- text ------------------------------------------------------------------------------
    COLUMNS = ("node", "op", "target", "shape", "dtype", "flops", "out", "saved", "params", "layer", "sharding")
    WIDTHS = (28, 13, 34, 18, 8, 9, 9, 9, 9, 10, 10)

    def format(self, formulas: bool = False) -> str:
        rows = [self.COLUMNS]
        for node in self.graph.nodes:
            m = node.meta.get(META_KEY)
            if m is None:
                rows.append((node.name, node.op, target_name(node)) + ("-",) * 8)
                continue
            shape = "-" if m.shape is None else "[" + ",".join(str(s) for s in m.shape) + "]"
            rows.append((node.name, node.op, target_name(node), shape, _short_dtype(m.dtype),
                         _human(m.flops), _human(m.output_bytes), _human(m.saved_bytes), _human(m.param_bytes),
                         m.layer or "-", "-" if m.placement is None else str(m.placement)))
        # Columns as wide as their longest cell (at least WIDTHS): aligned, never truncated, so
        # parse() gets every name back whole.
        widths = [max([w] + [len(str(row[i])) + 1 for row in rows]) for i, w in enumerate(self.WIDTHS)]
        text = "\n".join(" ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)
        if formulas:  # costs as sympy expressions in batch b and sequence length s
            text += "\n\n" + "\n".join(
                f"{n.name:<28} flops={f['flops']}  saved={f['saved_bytes']}  out={f['output_bytes']}"
                for n in self.graph.nodes if (f := self.meta(n).formulas) and (f["flops"] or f["saved_bytes"]))
        return text

    def print(self, formulas: bool = False) -> None:
        print(self.format(formulas))

    def summary(self) -> str:
        lines = [f"{len(self.graph.nodes)} nodes, {len(self.layers)} layers "
                 f"({len(self.block_layers)} repeated blocks), captured with {self.capture}"]
        for layer in self.layers:
            flops = _human(self.total('flops', layer))
            lines.append(f"  {layer:<12} nodes={len(self.nodes_of(layer)):<4} flops={flops:<8}"
                         f" params={_human(self.total('param_bytes', layer)) + 'B':<8}"
                         f" saved={_human(self.total('saved_bytes', layer))}B")
        return "\n".join(lines)

    @staticmethod
    def parse(text: str) -> list[tuple[str, str, str]]:
        """(node, op, target) for every row of `format()`'s output."""
        rows = []
        for line in text.split("\n\n")[0].splitlines()[1:]:
            name, op, target = line.split()[:3]
            rows.append((name, op, target))
        return rows


def reads_inputs(node: fx.Node, follow=lambda n: True) -> bool:
    """Whether `node`'s value is computed from a graph input (a placeholder), walking back
    through the inputs `follow` accepts."""
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        if current.op == "placeholder":
            return True
        seen.add(current)
        frontier.extend(n for n in current.all_input_nodes if n not in seen and follow(n))
    return False


_FUNCTION_NAMES: dict = {}  # call_function target -> its name (the pass manager names every node after each pass)


def target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        try:
            return _FUNCTION_NAMES[node.target]
        except (KeyError, TypeError):
            pass
        try:
            name = _get_qualified_name(node.target)
        except Exception:  # builtins without a module
            name = getattr(node.target, "__name__", str(node.target))
        if len(_FUNCTION_NAMES) > 4096:  # bounded: user functions come and go
            _FUNCTION_NAMES.clear()
        try:
            _FUNCTION_NAMES[node.target] = name
        except TypeError:  # an unhashable target: named each time
            pass
        return name
    return str(node.target).replace(" ", "")


def _short_dtype(dtype: str | None) -> str:
    return "-" if dtype is None else dtype.replace("torch.", "")


def _human(value: int) -> str:
    if not value:
        return "0"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(int(value))
