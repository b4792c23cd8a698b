"""The IR: a torch.fx GraphModule whose nodes carry a typed `NodeMeta` in node.meta["pcompile"].

Graph-level facts (the ordered layers, how each parameter is sharded, the plan being
realised) live on the `IR` object next to the GraphModule. The text form of `IR.format()` is
stable (fixed columns, no wrapping) so tests compare it, and `IR.parse()` reads it back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name

META_KEY = "pcompile"
SYMBOLIC_KEY = "pcompile_symbolic"  # {quantity: sympy expr in b, s}, written by passes/symbolic.py


@dataclass
class NodeMeta:
    """What the analysis passes know about one node. Bytes and FLOPs are for the full
    (unsharded) example batch; `sharding` is set by the rewrite passes."""

    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    value: object = None  # python scalars / shapes computed at trace time (sizes, ints)
    flops: int = 0  # forward FLOPs
    bwd_flops: int = 0
    output_bytes: int = 0
    saved_bytes: int = 0  # activation bytes autograd keeps for backward (parameters excluded)
    param_bytes: int = 0  # parameters this node reads (call_module / get_attr)
    layer: str | None = None
    sharding: str | None = None  # "R", "S(d)@tp", "P@tp" once the rewrite assigned one


@dataclass(frozen=True)
class ParamSharding:
    """A parameter split into `size` equal chunks along `dim` over mesh `axis`.

    With `blocks` > 1 the parameter is `blocks` equal blocks along `dim` (a fused projection:
    GPT-2's c_attn holds q, k and v side by side) and each block is chunked by `size`: rank r
    keeps the r-th chunk of every block, so its local q, k and v are again side by side."""

    axis: str
    dim: int
    size: int
    blocks: int = 1

    def chunk(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s part of the full tensor (a view when blocks == 1)."""
        if self.blocks == 1:
            return full.chunk(self.size, dim=self.dim)[rank]
        return torch.cat([block.chunk(self.size, dim=self.dim)[rank]
                          for block in full.chunk(self.blocks, dim=self.dim)], dim=self.dim)

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's part, in rank order (inverse of `chunk`)."""
        if self.blocks == 1:
            return torch.cat(parts, dim=self.dim)
        per_rank = [part.chunk(self.blocks, dim=self.dim) for part in parts]
        return torch.cat([per_rank[r][b] for b in range(self.blocks) for r in range(len(parts))], dim=self.dim)

    def local_shape(self, shape) -> torch.Size:
        shape = list(shape)
        shape[self.dim] //= self.size
        return torch.Size(shape)


def take_shards(module: torch.nn.Module, shardings: dict[str, ParamSharding], coords: dict[str, int]) -> None:
    """Replace every split parameter of `module` by this rank's part, under every name it has:
    tied weights (a GPT's embedding and LM head) stay one parameter, chunked once. Names
    `module` does not hold (another pipeline stage's) are skipped."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    done: set[int] = set()
    for name, sharding in shardings.items():
        try:
            full = module.get_parameter(name)
        except AttributeError:
            continue
        if id(full) in done:
            continue
        local = sharding.chunk(full.detach(), coords[sharding.axis]).clone(memory_format=torch.contiguous_format)
        local = torch.nn.Parameter(local, requires_grad=full.requires_grad)
        for alias in names[id(full)]:
            path, _, attr = alias.rpartition(".")
            setattr(module.get_submodule(path) if path else module, attr, local)
        done.add(id(local))


@dataclass
class IR:
    gm: fx.GraphModule
    layers: list[str] = field(default_factory=list)  # ordered: "pre", blocks..., "post"
    block_layers: list[str] = field(default_factory=list)  # the repeated blocks only
    param_shardings: dict[str, ParamSharding] = field(default_factory=dict)
    capture: str = "fx"

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def replace(self, **changes) -> "IR":
        return dataclasses.replace(self, **changes)

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
                         m.layer or "-", m.sharding or "-"))
        # Columns as wide as their longest cell (at least WIDTHS): aligned, never truncated, so
        # parse() gets every name back whole.
        widths = [max([w] + [len(str(row[i])) + 1 for row in rows]) for i, w in enumerate(self.WIDTHS)]
        text = "\n".join(" ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)
        if formulas:  # costs as sympy expressions in batch b and sequence length s
            text += "\n\n" + "\n".join(
                f"{n.name:<28} flops={f['flops']}  saved={f['saved_bytes']}  out={f['output_bytes']}"
                for n in self.graph.nodes if (f := n.meta.get(SYMBOLIC_KEY)) and (f["flops"] or f["saved_bytes"]))
        return text

    def print(self, formulas: bool = False) -> None:
        print(self.format(formulas))

    def summary(self) -> str:
        lines = [f"{len(self.graph.nodes)} nodes, {len(self.layers)} layers "
                 f"({len(self.block_layers)} repeated blocks), captured with {self.capture}"]
        for layer in self.layers:
            lines.append(f"  {layer:<12} nodes={len(self.nodes_of(layer)):<4} flops={_human(self.total('flops', layer)):<8}"
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


def target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        try:
            return _get_qualified_name(node.target)
        except Exception:  # builtins without a module
            return getattr(node.target, "__name__", str(node.target))
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
