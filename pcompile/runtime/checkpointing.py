"""Activation checkpointing at run time: the ops the `activation_checkpoint` pass puts into
the graph (passes/activation_checkpoint.py): a checkpointed layer's nodes become one region
GraphModule run by `run_checkpointed`, and inside the region a call of module `m` (passed in
as an input, so parameters keep their names and owners) is `call_module_ref(m, *args)`."""
from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint

from pcompile.runtime import batch_norm, ops, rng


@ops.local
def run_checkpointed(region: torch.nn.Module, *args):
    """Run `region(*args)` keeping only `args` for backward; recompute the region in backward
    (drawing the same random masks: pcompile.runtime.rng). Under cm.compile() the region runs
    eagerly: torch.utils.checkpoint disables dynamo for what it calls."""
    return torch.utils.checkpoint.checkpoint(region, *args, use_reentrant=False, context_fn=_contexts)


def _contexts():
    """torch.utils.checkpoint's context_fn: the random streams replayed (pcompile.runtime.rng) and,
    while the region recomputes, batch norm's running statistics left alone (the first forward
    counted the batch: pcompile.runtime.batch_norm)."""
    forward, recompute = rng.checkpoint_contexts()

    @contextlib.contextmanager
    def recomputing():
        batch_norm._RECOMPUTING[0] = True
        try:
            with recompute:
                yield
        finally:
            batch_norm._RECOMPUTING[0] = False
    return forward, recomputing()


@ops.local
def call_module_ref(module: torch.nn.Module, *args, **kwargs):
    """A module call inside a region, the module being a region input (see module docstring)."""
    return module(*args, **kwargs)
