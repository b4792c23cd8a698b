"""Analysis: bytes each node keeps alive for backward, and the parameter bytes it reads.

Saved activations are observed, not guessed: the forward runs on fake tensors under
autograd's saved_tensors_hooks, and every saved tensor's storage is charged once to the node
that first saved it. Parameters and buffers are excluded (they are model state, not
activations).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from pcompile.ir import IR
from pcompile.ir.fake import fake_run
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.ir.replicate import annotate


def _param_bytes(ir: IR) -> dict[fx.Node, int]:
    """Each parameter charged once, to the first node that reads it (tied weights count once)."""
    seen: set[int] = set()
    charged: dict[fx.Node, int] = {}
    for node in ir.graph.nodes:
        params = []
        if node.op == "call_module":
            params = list(ir.gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr":
            value = ir.gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.nn.Parameter):
                params = [value]
        total = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        charged[node] = total
    return charged


@register_pass("memory", kind="analysis", requires=("annotated",), ensures=("memory",))
def memory(ir: IR, ctx: PassContext) -> IR:
    """Saved-for-backward bytes per node (observed with saved_tensors_hooks) and parameter bytes."""
    return annotate(ir, lambda target: observe_memory(target, ctx.example_inputs))  # repeated blocks: once


def observe_memory(ir: IR, inputs: tuple) -> None:
    seen: set[StorageWeakRef] = set()
    state_storages: set[StorageWeakRef] = set()
    saved: dict[fx.Node, int] = {}

    def note_state(node: fx.Node, value) -> None:
        # placeholders and get_attr results are inputs/state; remember parameter storages
        if node.op == "get_attr" and isinstance(value, torch.Tensor):
            state_storages.add(StorageWeakRef(value.untyped_storage()))

    @contextmanager
    def watch(node: fx.Node):
        total = 0
        if node.op == "call_module":
            for t in ir.gm.get_submodule(node.target).parameters():
                state_storages.add(StorageWeakRef(t.untyped_storage()))

        def pack(t: torch.Tensor):
            nonlocal total
            ref = StorageWeakRef(t.untyped_storage())
            if ref not in seen and ref not in state_storages:
                seen.add(ref)
                total += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        saved[node] = total

    fake_run(ir, inputs, note_state, hook=watch, grad=True)
    params = _param_bytes(ir)
    for node in ir.graph.nodes:
        meta = ir.meta(node)
        meta.saved_bytes = saved.get(node, 0)
        meta.param_bytes = params.get(node, 0)
