"""Rank functions for the expert-parallel tests: the built-in MoE GPT (4 experts, top-2, two
blocks) and the batch-statistics test's Hugging Face Mixtral (4 experts as batched weights,
top-2, aux loss) trained side by side with their serial copies under plans with ep, one launch
for many."""
from __future__ import annotations

import copy
import dataclasses
from unittest import mock

import torch
import torch.distributed as dist

import pcompile
from pcompile.models import MoEGPT, MoEGPTConfig, moe_gpt_inputs
from pcompile.passes.expert_parallel import EXPERT_PARAMS
from pcompile.runtime import ops
from pcompile.runtime.expert_parallel import expert_mixture, gated_expert_mixture
from pcompile.runtime.expert_placement import ExpertPlacement
from tests.distributed.ranks import train_side_by_side

CFG = MoEGPTConfig(num_layers=2, num_experts=4, top_k=2, hidden=16, num_heads=2, seq_len=8, vocab_size=32)
BATCH = 8


def skewed(cfg: MoEGPTConfig) -> MoEGPT:
    """Every block's router biased to experts 0 and 1 (top-2: no token reaches 2 or 3), so
    under ep4 two ranks receive no rows at all and must still take part in every all-to-all."""
    model = MoEGPT(cfg)
    for block in model.blocks:
        old = block.moe.router
        block.moe.router = torch.nn.Linear(cfg.hidden, cfg.num_experts)
        with torch.no_grad():
            block.moe.router.weight.copy_(old.weight)
            block.moe.router.bias.copy_(torch.tensor([20.0, 20.0, -20.0, -20.0]))
    return model


def _held(cm) -> float:
    """Experts per MoE layer this rank holds: the chunk of batched expert weights, or the
    expert parameters with values (4 per expert, 2 layers)."""
    named = list(cm.named_parameters())  # a pipeline rank: its stages' (one MoE layer each here)
    stacked = [p.shape[0] for n, p in named if ".experts." in n and p.dim() == 3]
    if stacked:
        return stacked[0]
    layers = {n.split(".experts.")[0] for n, _ in named if ".experts." in n}
    return sum(p.numel() > 0 for n, p in named if ".experts." in n) / 4 / len(layers)


def _fc_rows(cm) -> int | None:
    """Rows of the first expert fc weight this rank holds (a tp slice under etp); None for batched experts."""
    return next((p.shape[0] for n, p in cm.named_parameters() if n.endswith(".fc.weight") and ".experts." in n
                 and p.numel()), None)


def _norm_gap(cm, serial, inputs) -> float:
    """One more step: the gradient norm clipping computes (the experts counted once) vs serial's."""
    batch = inputs(7)
    cm.train_step(*batch)
    serial(*batch).backward()
    got = cm.clip_grad_norm_(1e9).item()
    return abs(got - torch.nn.utils.clip_grad_norm_(serial.parameters(), 1e9).item())


def _accumulation(cm, serial, inputs) -> tuple[float, float]:
    """4 train_steps before one optimizer step (3 under no_sync), then 4 synced ones without
    zeroing, against the serial model's 4 backward passes (worst gradient gaps)."""
    from tests.distributed.ranks import _max_diff

    for p in list(cm.parameters()) + list(serial.parameters()):
        p.grad = None
    batches = [inputs(10 + step) for step in range(4)]
    for batch in batches:
        serial(*batch).backward()
    expected = {n: p.grad for n, p in serial.named_parameters()}
    for i, batch in enumerate(batches):
        if i < 3:
            with cm.no_sync():
                cm.train_step(*batch)
        else:
            cm.train_step(*batch)
    no_sync = _max_diff(cm.full_grads(), expected)
    for p in cm.parameters():
        p.grad = None
    for batch in batches:
        cm.train_step(*batch)
    return no_sync, _max_diff(cm.full_grads(), expected)


def _rebalance_refused(cm) -> str | None:
    """The cause of cm.rebalance()'s refusal (pipelines), or None."""
    from pcompile.errors import PcompileError

    try:
        cm.rebalance(threshold=1.0)
    except PcompileError as refused:
        return str(refused)
    return None


def compare_many(cases) -> list[dict]:
    """Each (aux_loss_coef, plan[, "skewed"]): loss and gradient gaps to serial over 3 AdamW
    steps, the number of expert_mixture nodes in the rewritten graph and of all-to-alls run, the
    experts per layer rank 0 holds (and the rows of its first expert fc weight), the clipping
    norm's gap to serial after one more step,
    the tokens cm.expert_loads() counted per layer over the 3
    steps and (pipelines) why cm.rebalance() refused."""
    out = []
    for coef, plan, *options in cases:
        cfg = dataclasses.replace(CFG, aux_loss_coef=coef, top_k=1 if "top1" in options else CFG.top_k)
        build = (lambda: skewed(cfg)) if "skewed" in options else (lambda: MoEGPT(cfg))
        inputs = lambda step: moe_gpt_inputs(cfg, BATCH, seed=step)  # noqa: E731
        if "mixtral" in options:  # HF Mixtral (export; batched experts, aux loss 0.1): the statistics test's
            from tests.distributed.ranks_statistics import batch, mixtral

            build, inputs = mixtral, batch
        with mock.patch.object(dist, "all_to_all_single", wraps=dist.all_to_all_single) as all_to_all:
            cm, serial, loss_diff, grad_diff, losses = train_side_by_side(build, inputs, plan, steps=3, lr=1e-2)
        mixtures = len({node.meta[EXPERT_PARAMS] for _, node in ops.collectives_of(cm.ir.gm)  # checkpoint regions too
                        if node.target in (expert_mixture, gated_expert_mixture)})
        loads = cm.expert_loads() if plan.pp == 1 else {}  # the 3 steps' tokens per expert (pipelines refuse)
        out.append({"plan": plan.default.describe(), "coef": coef, "loss_diff": loss_diff, "grad_diff": grad_diff,
                    "losses": losses, "mixtures": mixtures, "routed": [sum(v) for v in loads.values()],
                    "rebalance_refused": _rebalance_refused(cm) if plan.pp > 1 else None,
                    "all_to_alls": all_to_all.call_count, "held": _held(cm), "fc_rows": _fc_rows(cm),
                    "norm_diff": _norm_gap(cm, serial, inputs)})
        if "accumulate" in options:
            out[-1]["no_sync_diff"], out[-1]["synced_diff"] = _accumulation(cm, serial, inputs)
    return out


# FlexMoE's rebalancing (backends/expert_rebalance.py): placements forced in the tests, each both
# moving experts and replicating some (E = 4; the static ones: ep4 r0:[0] .. r3:[3], ep2 r0:[0, 1] r1:[2, 3])
FORCED = {4: ExpertPlacement(((0, 1), (2,), (0, 3), (1,)), 4),  # r0:[0, 2] r1:[0, 3] r2:[1] r3:[2]
          2: ExpertPlacement(((0, 1), (1,), (0,), (0, 1)), 2)}  # r0:[0, 2, 3] r1:[0, 1, 3]


def _rebalanced(plan, kind: str) -> dict:
    """3 AdamW steps side by side with the serial model, the experts rebalanced between steps 1
    and 2: forced (FORCED; kind "forced", or "mixtral": HF Mixtral's batched experts) or, kind
    "skewed", as the planner proposes for the skewed router (threshold 1.0); kind "etp": forced
    under a plan with expert tensor parallelism. Also: the loads
    step 1 measured, the placements applied, the rebalanced ranks' loads of step 2 (max /
    mean), how many experts rank 0 holds after, and the full state's gap."""
    from tests.distributed.ranks import _max_diff, gap

    torch.manual_seed(0)
    model = skewed(CFG) if kind == "skewed" else MoEGPT(CFG)
    inputs = lambda step: moe_gpt_inputs(CFG, BATCH, seed=step)  # noqa: E731
    if kind == "mixtral":
        from tests.distributed.ranks_statistics import batch, mixtral

        model, inputs = mixtral(), batch
    serial = copy.deepcopy(model)
    cm = pcompile.compile(model, pcompile.Cluster.local(4), inputs(0), plan=plan)
    optimizers = (torch.optim.AdamW(cm.parameters(), lr=1e-2), torch.optim.AdamW(serial.parameters(), lr=1e-2))
    ep = plan.strategy_for("blocks.0").ep  # the MoE blocks' (the default may be ep=1)
    out = {"plan": plan.default.describe(), "loss_diff": 0.0, "grad_diff": 0.0}
    for step in range(3):
        if step == 1:
            out["loads"] = cm.expert_loads()
            forced = None if kind == "skewed" else {layer: FORCED[ep] for layer in out["loads"]}
            applied = cm.rebalance(optimizers[0], threshold=1.0, placements=forced)
            out["applied"] = {layer: p.describe() for layer, p in applied.items()}
        batch = inputs(step)
        loss = cm.train_step(*batch)
        expected = serial(*batch)
        expected.backward()
        out["loss_diff"] = max(out["loss_diff"], gap(loss.item(), expected.item()))
        out["grad_diff"] = max(out["grad_diff"], _max_diff(cm.full_grads(),
                                                           {n: p.grad for n, p in serial.named_parameters()}))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        if step == 1:
            after = cm.expert_loads()
            out["imbalance_after"] = max(cm.experts.routes[layer].placement.imbalance(after[layer]) for layer in after)
    out["imbalance_before"] = max(ExpertPlacement.static(len(loads), ep).imbalance(loads)
                                  for loads in out["loads"].values())
    out["held_after"] = _held(cm)
    out["param_diff"] = _max_diff(cm.full_state_dict(), serial.state_dict())
    if kind in ("mixtral", "etp"):
        out["saved_diff"], out["loaded_diff"] = _round_trip(cm, optimizers[0])
    out["norm_diff"] = _norm_gap(cm, serial, inputs)
    return out


def _round_trip(cm, optimizer) -> tuple[float, float]:
    """A checkpoint of the rebalanced model (re-stacked expert weights saved whole, etp's expert
    slices as tp shards): its parameters read back as a plain state dict, and, loaded into `cm`
    after its parameters and moments were zeroed, its parameters and moments: the worst gaps to
    what `cm` held before saving (exact: 0)."""
    import shutil
    import tempfile

    from pcompile import checkpoint
    from tests.distributed.ranks import _max_diff

    where = [tempfile.mkdtemp(prefix="pcompile-moe-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(where)
    params, moments = cm.full_state_dict(), checkpoint.full_optimizer_state(cm, optimizer)
    path = checkpoint.save(cm, where[0], optimizer, step=3)
    saved = _max_diff(checkpoint.load_full(path), params)
    with torch.no_grad():
        for tensor in [*cm.parameters(), *(v for s in optimizer.state.values() for v in s.values() if v.dim() > 0)]:
            tensor.zero_()
    checkpoint.load(cm, path, optimizer)
    loaded = max(_max_diff(cm.full_state_dict(), params),
                 _max_diff(checkpoint.full_optimizer_state(cm, optimizer), moments))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(where[0], ignore_errors=True)
    return saved, loaded


def compare_rebalanced(cases) -> list[dict]:
    """Each (plan, kind): `_rebalanced`, with its seconds on this rank."""
    import time

    out = []
    for plan, kind in cases:
        began = time.perf_counter()
        out.append(_rebalanced(plan, kind))
        out[-1]["seconds"] = time.perf_counter() - began
    return out


def cli_rebalanced(plan) -> dict:
    """`pcompile run tests/cli/moe_factory.py:moe --rebalance-every 1 --steps 3` as its ranks run
    it (cli.train_rank), and the serial model's losses under the same AdamW steps and clipping."""
    from pcompile import cli

    factory = "tests/cli/moe_factory.py:moe"
    options = cli.RunOptions(steps=3, lr=1e-2, log="stderr", rebalance_every=1)
    records = cli.train_rank(factory, plan.to_json(), options)["steps"]
    model, inputs = cli.load_workload(factory).model, cli.load_workload(factory).inputs
    optimizer, serial = torch.optim.AdamW(model.parameters(), lr=1e-2), []
    for _ in range(3):
        loss = model(*inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip)
        optimizer.step()
        optimizer.zero_grad()
        serial.append(loss.item())
    return {"losses": [r["loss"] for r in records], "serial": serial,
            "rebalanced": [r.get("rebalanced") for r in records]}


def compare_all(cases, rebalanced, cli_plan) -> tuple[list[dict], list[dict], dict]:
    """compare_many(cases), compare_rebalanced(rebalanced) and cli_rebalanced(cli_plan) in one launch."""
    return compare_many(cases), compare_rebalanced(rebalanced), cli_rebalanced(cli_plan)
