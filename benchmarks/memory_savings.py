"""Memory of one training step on CPU, measured with MemTracker (every tensor's storage counted),
against what the IR predicts, for activation checkpointing and operator splitting.

1. Checkpointing every block of a GPT. Predicted from the IR before the rewrite: the blocks'
   saved activations (the `memory` pass's saved_bytes) minus what checkpointing keeps (each
   region's activation inputs, the saved_bytes of the run_checkpointed calls). Measured: live
   tensor bytes right after forward (what autograd holds for backward) without and with
   checkpointing.
2. Operator splitting k=2/4 of every block's Linears, weights resident (no sdp): the IR predicts
   no change in saved activations (chunks are views of the saved inputs). Splitting adds only
   temporaries inside the split Linears (up to 2 extra partial outputs in forward; the k chunk
   gradients concatenated into W.grad in backward, up to one extra W); whether they move the
   step's peak depends on where that peak is: printed as measured. Splitting alone saves nothing.
3. Operator splitting with each weight *gathered per use* (a ZeRO-3 all-gather emulated on one
   device: the weight, or the weight chunk, is copied before its matmul and freed after, in
   forward and again in backward). Predicted: the forward peak falls by the largest gathered
   weight times (1 - 1/k). Measured: forward peak with k=1 minus with k.

Usage: python benchmarks/memory_savings.py. Last line: key=value figures.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

import pcompile
from pcompile.api import PIPELINE
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.plan import LayerAssignment, Plan, Strategy
from pcompile.runtime.checkpointing import run_checkpointed

PASSES = PIPELINE  # the full pipeline: operator_split and checkpoint run as in compile()
MB = 2**20


def block_plan(cfg: GPTConfig, **fields) -> Plan:
    blocks = tuple(LayerAssignment(f"blocks.{i}", Strategy(**fields)) for i in range(cfg.num_layers))
    return Plan(num_devices=1, layers=blocks)


def compiled(cfg: GPTConfig, batch: int, plan: Plan):
    torch.manual_seed(0)
    return pcompile.compile(GPT(cfg), pcompile.Cluster.local(1), gpt_inputs(cfg, batch), plan=plan, passes=PASSES)


def measure(gm: torch.nn.Module, inputs: tuple) -> dict[str, int]:
    """Live bytes after forward, forward peak and step peak (forward + backward), all tensors."""
    tracker = MemTracker()
    tracker.track_external(gm)
    with tracker:
        loss = gm(*inputs)
        after_forward = tracker.get_tracker_snapshot("current")
        forward_peak = tracker.get_tracker_snapshot("peak")
        loss.backward()
        step_peak = tracker.get_tracker_snapshot("peak")

    def total(snapshot):
        return sum(v["Total"] for v in snapshot.values())
    for p in gm.parameters():
        p.grad = None
    return {"after_forward": total(after_forward), "forward_peak": total(forward_peak), "step_peak": total(step_peak)}


# -- 3: emulated per-use gather ------------------------------------------------------------
class _GatheredLinear(torch.autograd.Function):
    """linear(x, w, b) with w materialised (copied, as an all-gather would) only for the matmul,
    in forward and again in backward; autograd keeps x and w (a view of the resident shard)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return F.linear(x, w.clone(), b)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        flat_grad, flat_x = grad.flatten(0, -2), x.flatten(0, -2)
        return grad @ w.clone(), flat_grad.T @ flat_x, flat_grad.sum(0) if ctx.has_bias else None


def gathered_linear(x, w, b=None):
    return _GatheredLinear.apply(x, w, b)


def gather_per_use(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """Every Linear of the blocks (nn.Linear calls and the split partial linears) runs through
    gathered_linear; returns the graph and the largest weight (chunk) bytes gathered at once."""
    largest = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith("blocks.") and isinstance(
                gm.get_submodule(node.target), torch.nn.Linear):
            with gm.graph.inserting_before(node):
                w = gm.graph.get_attr(f"{node.target}.weight")
                b = gm.graph.get_attr(f"{node.target}.bias")
                new = gm.graph.call_function(gathered_linear, (node.args[0], w, b))
            weight = gm.get_parameter(f"{node.target}.weight")
            largest = max(largest, weight.numel() * weight.element_size())
        elif node.op == "call_function" and node.target is torch._C._nn.linear:
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(gathered_linear, tuple(node.args))
            chunk = node.args[1]  # getitem(chunk(W, k, 1), i)
            weight = gm.get_parameter(chunk.args[0].args[0].target)
            largest = max(largest, weight.numel() * weight.element_size() // chunk.args[0].args[1])
        else:
            continue
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, largest


def main() -> None:
    torch.set_num_threads(2)
    # 1 + 2: activations dominate (batch 8 x 256 tokens)
    cfg = GPTConfig(vocab_size=512, seq_len=256, hidden=128, num_heads=4, num_layers=4)
    batch = 8
    inputs = gpt_inputs(cfg, batch)
    base = compiled(cfg, batch, Plan(num_devices=1))
    ckpt = compiled(cfg, batch, block_plan(cfg, checkpoint=True))
    blocks = [f"blocks.{i}" for i in range(cfg.num_layers)]
    dropped = sum(base.ir.total("saved_bytes", b) for b in blocks)
    kept = sum(ckpt.ir.meta(n).saved_bytes for n in ckpt.ir.graph.nodes if n.target is run_checkpointed)
    predicted = dropped - kept
    m_base, m_ckpt = measure(base.gm, inputs), measure(ckpt.gm, inputs)
    measured = m_base["after_forward"] - m_ckpt["after_forward"]
    ckpt_err = 100 * (measured - predicted) / predicted
    print(f"GPT {cfg.num_layers} blocks, hidden {cfg.hidden}, batch {batch} x {cfg.seq_len} tokens")
    print(f"checkpoint every block: saved activations predicted -{predicted / MB:.2f} MiB "
          f"(blocks save {dropped / MB:.2f} MiB, regions keep {kept / MB:.2f} MiB), measured -{measured / MB:.2f} "
          f"MiB after forward ({ckpt_err:+.1f}%); step peak {m_base['step_peak'] / MB:.2f} -> "
          f"{m_ckpt['step_peak'] / MB:.2f} MiB")
    split_figures = {}
    for k in (2, 4):
        m_split = measure(compiled(cfg, batch, block_plan(cfg, split=k)).gm, inputs)
        split_figures[k] = (m_split["after_forward"] - m_base["after_forward"],
                            m_split["step_peak"] - m_base["step_peak"])
        print(f"split={k}, weights resident: saved activations predicted +0.00 MiB, measured "
              f"{split_figures[k][0] / MB:+.2f} MiB; step peak {split_figures[k][1] / MB:+.2f} MiB "
              "(its temporaries stay below the peak, which is at the LM head and loss)")
    # 3: weights dominate (batch 1 x 16 tokens, hidden 512): the gathered copy is the forward peak
    wcfg = GPTConfig(vocab_size=64, seq_len=16, hidden=512, num_heads=4, num_layers=2)
    winputs = gpt_inputs(wcfg, 1)
    gm1, w1 = gather_per_use(compiled(wcfg, 1, Plan(num_devices=1)).gm)
    peak1 = measure(gm1, winputs)["forward_peak"]
    split_errs = []
    for k in (2, 4):
        gmk, wk = gather_per_use(compiled(wcfg, 1, block_plan(wcfg, split=k)).gm)
        predicted_k, measured_k = w1 - wk, peak1 - measure(gmk, winputs)["forward_peak"]
        split_errs.append(100 * (measured_k - predicted_k) / predicted_k)
        print(f"split={k}, weights gathered per use (emulated ZeRO-3): forward peak predicted "
              f"-{predicted_k / MB:.2f} MiB (largest gathered weight {w1 / MB:.2f} -> {wk / MB:.2f} MiB), "
              f"measured -{measured_k / MB:.2f} MiB ({split_errs[-1]:+.1f}%)")
    print(f"ckpt_saved_pred_mb={predicted / MB:.3f} ckpt_saved_meas_mb={measured / MB:.3f} ckpt_err_pct={ckpt_err:.1f} "
          f"split2_peak_delta_mb={split_figures[2][1] / MB:.3f} split4_peak_delta_mb={split_figures[4][1] / MB:.3f} "
          f"split_gathered_peak_err_pct={max(split_errs, key=abs):.1f}")


if __name__ == "__main__":
    main()
