"""Random streams for the ops of a lowered graph that draw random numbers (dropout, attention
dropout, rand*): Megatron's RNG tracker, generalised to pcompile's placements.

A mask must be the same on the ranks that hold the same activation and differ elsewhere:
- a replicated activation (the residual stream under tp) is computed by every rank of the tp
  group: its dropout mask must agree across them, or their copies diverge silently (the
  replicated parameters' gradients then differ per rank);
- an activation cut over a tp axis (attention heads, a sequence-parallel shard) holds other
  elements on each tp rank: its mask must differ per tp rank (Megatron's model-parallel RNG);
- data-parallel ranks, and the ranks of another pipeline stage, hold other samples or layers:
  their masks differ (Megatron shares them across dp by default; independent draws are what
  the serial model's mask over the whole batch is).
So every random op runs in a stream named by the mesh axes whose coordinates its mask depends
on (`stream_axes`): the batch-splitting dp axis of its layer, "pp" under pipelining, and the
tp axis when its input is cut over one. A stream is a generator state seeded by (base seed,
those axes and this rank's coordinates on them): ranks that share the coordinates share the
stream and - running the same graph - draw the same masks. `bind_streams` puts `enter` /
`leave` nodes around every random op of a rank's graph: they swap the device's default
generator state with the stream's (as Megatron's tracker.fork()), so the op itself (F.dropout,
SDPA's dropout_p) is unchanged and the user's own generator is neither read nor advanced.

Activation checkpointing replays a region's forward in backward: `checkpoint_contexts` (the
context_fn of torch.utils.checkpoint) gives the recomputation the streams' states at the
region's first forward, so it draws the same masks (torch.utils.checkpoint restores only the
default generator's state).

Ops drawn at p = 0 (dropout 0, attention dropout_p 0) are not random and stay as they are.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.fx as fx
import torch.nn.functional as F

from pcompile.ir.graph import META_KEY
from pcompile.runtime import ops

# python-level random functions (fx captures); aten ops carry torch.Tag.nondeterministic_seeded
_RANDOM_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                     F.scaled_dot_product_attention, F.rrelu, torch.dropout, torch.rand, torch.randn, torch.randint,
                     torch.rand_like, torch.randn_like, torch.randint_like, torch.bernoulli, torch.normal,
                     torch.multinomial, torch.randperm, torch.poisson}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_",
                   "cauchy_", "log_normal_"}
# the probability argument (index, keyword) of ops that draw nothing at p = 0
_PROBABILITY = {F.dropout: (1, "p"), F.dropout1d: (1, "p"), F.dropout2d: (1, "p"), F.dropout3d: (1, "p"),
                F.alpha_dropout: (1, "p"), F.feature_alpha_dropout: (1, "p"), torch.dropout: (1, "p"),
                F.scaled_dot_product_attention: (4, "dropout_p"), torch.ops.aten.dropout.default: (1, "p"),
                torch.ops.aten.native_dropout.default: (1, "p"),
                torch.ops.aten.scaled_dot_product_attention.default: (4, "dropout_p")}
_PROBABILITY_DEFAULTS = {"p": 0.5, "dropout_p": 0.0}


def is_random(node: fx.Node, owner: torch.nn.Module) -> bool:
    """Whether `node` (of the graph of `owner`) draws random numbers when it runs."""
    if node.op == "call_module":
        module = owner.get_submodule(node.target)
        if isinstance(module, (torch.nn.modules.dropout._DropoutNd, torch.nn.RReLU)):
            return getattr(module, "p", 1.0) > 0
        return False
    if node.op == "call_method":
        return node.target in _RANDOM_METHODS
    if node.op != "call_function" or ops.op_of(node) is not None:
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        random = torch.Tag.nondeterministic_seeded in target.tags
    else:
        try:
            random = target in _RANDOM_FUNCTIONS
        except TypeError:  # an unhashable target
            return False
    if random and target in _PROBABILITY:
        index, keyword = _PROBABILITY[target]
        p = node.args[index] if len(node.args) > index else node.kwargs.get(keyword, _PROBABILITY_DEFAULTS[keyword])
        return not (isinstance(p, (int, float)) and p == 0)
    return random


def stream_axes(node: fx.Node, data_axis: str, pipelined: bool) -> tuple[str, ...]:
    """The mesh axes a random node's draws depend on: `data_axis` (its layer's batch split),
    "pp" when pipelined, and every tp axis its first tensor input is cut over."""
    axes = [data_axis] + (["pp"] if pipelined else [])
    source = next((a for a in node.args if isinstance(a, fx.Node)), None)
    meta = source.meta.get(META_KEY) if source is not None else None
    placement = getattr(meta, "placement", None)
    for shard in getattr(placement, "shards", ()):
        if shard.axis.startswith("tp") and shard.size > 1 and shard.axis not in axes:
            axes.append(shard.axis)
    return tuple(axes)


def stream_seed(base: int, coordinates: tuple[tuple[str, int], ...]) -> int:
    """The seed of a stream: stable across processes for one base seed and coordinates."""
    text = f"{base}:" + ",".join(f"{axis}={c}" for axis, c in coordinates)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


class Streams:
    """This rank's random streams: key -> generator state of `device`'s default generator kind."""

    def __init__(self, device: torch.device):
        self.device = device
        self.states: dict[str, torch.Tensor] = {}
        self.seeds: dict[str, int] = {}

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def add(self, key: str, seed: int) -> None:
        self.seeds[key] = seed

    def reseed(self, base: int, coordinates_of) -> None:
        """Every stream from `base`: `coordinates_of(key)` -> its ((axis, coordinate), ...)."""
        saved = self._get()
        try:
            for key in self.seeds:
                self.seeds[key] = stream_seed(base, coordinates_of(key))
                if self.device.type == "cuda":
                    torch.cuda.manual_seed(self.seeds[key])
                else:
                    torch.manual_seed(self.seeds[key])
                self.states[key] = self._get()
        finally:
            self._set(saved)

    def enter(self, key: str) -> torch.Tensor:
        saved = self._get()
        self._set(self.states[key])
        return saved

    def leave(self, key: str, saved: torch.Tensor) -> None:
        self.states[key] = self._get()
        self._set(saved)


_STREAMS: dict[str, Streams] = {}  # "pcompile{uid}" -> the compiled model's streams


def register(prefix: str, streams: Streams) -> None:
    _STREAMS[prefix] = streams


def unregister(prefix: str) -> None:
    _STREAMS.pop(prefix, None)


def _split(key: str) -> tuple[Streams, str]:
    prefix, _, name = key.partition("|")
    return _STREAMS[prefix], name


@ops.local
def enter(key: str) -> torch.Tensor:
    """Before a random op: the stream's state becomes the device's; returns the state it replaced."""
    streams, name = _split(key)
    return streams.enter(name)


@ops.local
def leave(key: str, saved: torch.Tensor, out):
    """After a random op: the stream keeps the advanced state, the device gets its own back;
    returns the op's output (its users read it through this node, which orders the two)."""
    streams, name = _split(key)
    streams.leave(name, saved)
    return out


def bind_streams(module: torch.nn.Module, prefix: str, axes_of) -> set[tuple[str, ...]]:
    """Put every random op of the graphs of `module` (nested ones included) in its stream:
    `axes_of(node)` -> its stream's axes. Returns the axes of the streams used."""
    used = set()
    for gm in module.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        graph, changed = gm.graph, False
        for node in list(graph.nodes):
            if not is_random(node, gm):
                continue
            axes = axes_of(node)
            used.add(axes)
            key = f"{prefix}|{','.join(axes)}"
            with graph.inserting_before(node):
                saved = graph.call_function(enter, (key,))
            with graph.inserting_after(node):
                out = graph.call_function(leave, (key, saved, node))
            node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
            changed = True
        if changed:
            gm.recompile()
    return used


@contextlib.contextmanager
def untouched():
    """Random ops inside the block leave every stream where it was (a forward whose results are
    thrown away, like a pipeline stage's metadata inference, must not shift the masks)."""
    saved = {prefix: dict(s.states) for prefix, s in _STREAMS.items()}
    try:
        yield
    finally:
        for prefix, states in saved.items():
            if prefix in _STREAMS:
                _STREAMS[prefix].states.update(states)


def checkpoint_contexts():
    """torch.utils.checkpoint's context_fn: the recomputation of a region starts from the
    streams' states at its forward (and leaves them as they are afterwards)."""
    snapshot = {prefix: dict(s.states) for prefix, s in _STREAMS.items()}

    @contextlib.contextmanager
    def recompute():
        current = {prefix: dict(s.states) for prefix, s in _STREAMS.items()}
        for prefix, states in snapshot.items():
            if prefix in _STREAMS:
                _STREAMS[prefix].states.update(states)
        try:
            yield
        finally:
            for prefix, states in current.items():
                if prefix in _STREAMS:
                    _STREAMS[prefix].states.update(states)

    return contextlib.nullcontext(), recompute()
