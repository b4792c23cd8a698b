"""Rank functions for the run-time tests: random streams (dropout) and process-group cleanup."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import pcompile
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.plan import LayerAssignment

CFG = GPTConfig(vocab_size=128, hidden=64, num_layers=2, dropout=0.2)  # attention dropout: cut over heads
STEPS = 3


class DropoutGPT(GPT):
    """GPT with nanoGPT's residual and embedding dropout too: masks on activations every tp rank
    holds whole (the residual stream)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx, targets):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        for block in self.blocks:
            x = F.dropout(block(x), self.cfg.dropout, self.training)
        return F.cross_entropy(self.head(self.ln_f(x)).flatten(0, 1), targets.flatten())


def _compiled(plan, model=None):
    torch.manual_seed(0)
    model = model or DropoutGPT(CFG)
    torch.manual_seed(1000 + dist.get_rank())  # every process's own generator differs
    return pcompile.compile(model, pcompile.Cluster.local(dist.get_world_size()), gpt_inputs(CFG, 8), plan=plan)


def _gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def replicated_agree(plan) -> dict:
    """STEPS SGD steps with dropout; then every replicated parameter (LayerNorm weights, the
    position table) on every rank: tp ranks must hold the same values."""
    cm = _compiled(plan)
    optimizer = torch.optim.SGD(cm.parameters(), lr=0.5)
    losses = []
    for step in range(STEPS):
        losses.append(cm.train_step(*gpt_inputs(CFG, 8, seed=step)).item())
        optimizer.step()
        optimizer.zero_grad()
    local = dict(cm.named_parameters())
    names = [n for n in sorted(local) if n not in cm.ir.param_shardings and n not in cm.ir.sdp_shardings
             and ("ln" in n or "pos_emb" in n)]
    out = {"losses": losses, "coords": dict(cm.coords), "replicated": {n: local[n].detach().clone() for n in names}}
    cm.close()
    return out


def dp_masks_differ(plan) -> dict:
    """One step inside no_sync (gradients stay local) on a batch whose dp halves are the same
    samples: the dp ranks' local gradients are equal only if their masks are."""
    cm = _compiled(plan)
    x, y = gpt_inputs(CFG, 4, seed=0)
    x, y = torch.cat([x, x]), torch.cat([y, y])
    with cm.no_sync():
        cm.train_step(x, y)
    grad = next(p.grad for n, p in cm.named_parameters() if n.endswith("ln_f.weight"))
    out = {"coords": dict(cm.coords), "grads": _gathered(grad)}
    cm.close()
    return out


def checkpoint_replays(plan) -> dict:
    """The same seed with and without activation checkpointing of every block: the recomputed
    forward must draw the masks of the first one (equal loss and gradients)."""
    results = []
    for checkpointed in (False, True):
        layers = tuple(LayerAssignment(f"blocks.{i}", dataclasses.replace(plan.default,
                                                     checkpoint=checkpointed)) for i in range(CFG.num_layers))
        cm = _compiled(dataclasses.replace(plan, layers=layers)).manual_seed(7)
        loss = cm.train_step(*gpt_inputs(CFG, 8, seed=0)).item()
        results.append((loss, {n: p.grad.clone() for n, p in cm.named_parameters()}))
        cm.close()
    (loss, grads), (ckpt_loss, ckpt_grads) = results
    return {"loss_diff": abs(loss - ckpt_loss), "grad_diff": max((grads[n] - ckpt_grads[n]).abs().max().item()
                                                                  for n in grads)}


def groups_released(plan) -> dict:
    """Process groups alive before compile and after close (tied-weight groups included)."""
    from torch.distributed import distributed_c10d

    before = len(distributed_c10d._world.pg_map)
    model = GPT(dataclasses.replace(CFG, dropout=0.0))
    cm = pcompile.compile(model, pcompile.Cluster.local(dist.get_world_size()), gpt_inputs(CFG, 8), plan=plan)
    cm.train_step(*gpt_inputs(CFG, 8))
    during = len(distributed_c10d._world.pg_map)
    cm.close()
    return {"before": before, "during": during, "after": len(distributed_c10d._world.pg_map)}


class _Counting:
    """A torch.compile backend: aot_eager (dynamo + AOTAutograd, no code generation), counting
    the ops of the graphs it compiles."""

    def __init__(self):
        self.ops = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.ops += sum(1 for node in gm.graph.nodes if node.op == "call_function")
        return lookup_backend("aot_eager")(gm, example_inputs)


def compiled_equals_eager(plan, mixed_precision=None, steps: int = 1) -> dict:
    """AdamW steps of the lowered program, eager and under cm.compile: losses and gradients."""
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(CFG, dropout=0.0))
        cm = pcompile.compile(model, pcompile.Cluster.local(dist.get_world_size()), gpt_inputs(CFG, 8), plan=plan,
                              mixed_precision=mixed_precision)
        backend = _Counting()
        if compiled:
            cm.compile(backend=backend)
        optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-2)
        losses, grads = [], []
        for step in range(steps):
            losses.append(cm.train_step(*gpt_inputs(CFG, 8, seed=step)).item())
            grads.append([p.grad.clone() for p in cm.parameters()])
            optimizer.step()
            optimizer.zero_grad()
        runs.append((losses, grads, backend.ops))
        cm.close()
    (losses, grads, _), (compiled_losses, compiled_grads, compiled_ops) = runs
    return {"loss_diff": max(abs(a - b) for a, b in zip(losses, compiled_losses)),
            "grad_diff": max((a - b).abs().max().item() for g, h in zip(grads, compiled_grads) for a, b in zip(g, h)),
            "compiled_ops": compiled_ops}


def run_all(cases) -> list:
    fns = {"replicated": replicated_agree, "dp": dp_masks_differ, "checkpoint": checkpoint_replays,
           "groups": groups_released, "compile": compiled_equals_eager}
    return [fns[kind](*args) for kind, args in cases]
