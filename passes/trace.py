"""Front end: capture an nn.Module into an fx GraphModule, by one of two paths.

  fx      torch.fx.symbolic_trace: Python-level ops (call_module Linear, F.linear, view methods)
  export  torch.export (passes/export.py): aten-level ops, for models fx cannot trace
          (HuggingFace transformers, control flow on config or sizes)

`capture="auto"` tries fx first (its graph keeps the model's own modules) and falls back to
export, reporting which path was used and why: when fx fails, and when fx keeps a stock module
that holds Linears as one opaque call (nn.MultiheadAttention, nn.TransformerEncoderLayer /
DecoderLayer, nn.Transformer: fx does not trace into torch.nn modules, so tensor parallelism
would find nothing to split there) - if export fails on such a model, the fx graph stays.
`capture="fx"|"export"` forces one. Failures become one PcompileError naming the module path,
the construct, and the fix.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.ir.replicate import capture_repeated
from pcompile.passes.export import export_graph
from pcompile.sharding.tp_rules import opaque_linears

CAPTURES = ("auto", "fx", "export")


class _PathTracer(fx.Tracer):
    """fx's tracer, remembering the module path being traced when something fails."""

    def __init__(self):
        super().__init__()
        self.current_path = ""
        self.failed_path: str | None = None  # innermost module running when tracing failed

    def call_module(self, m, forward, args, kwargs):
        previous, self.current_path = self.current_path, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = self.current_path
            raise
        finally:
            self.current_path = previous


def explain_trace_failure(exc: Exception, path: str, model: torch.nn.Module) -> PcompileError:
    where = f"module {path!r} ({type(model.get_submodule(path)).__name__})" if path else \
        f"the top-level module ({type(model).__name__})"
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if "control flow" in text or "iteration" in text.lower() or "bool" in text.lower():
        construct = "Python control flow (if/for/while) on a tensor value"
        fix = ("make the branch static (depend on config, not on tensor values), or register the module "
               "as a leaf so it is not traced into")
    elif "Proxy" in text or "must be tuple of ints" in text or "int" in text or "positional argument" in text:
        construct = ("a tensor size used as a plain Python int (e.g. torch.ones(T, T) or buf[:T, :T] with T from "
                     "x.shape)")
        fix = "build masks and index ranges from torch.arange on the input's device, or register the module as a leaf"
    else:
        construct = "an operation torch.fx cannot record symbolically"
        fix = "register the module as a leaf"
    return PcompileError(f"cannot trace {where}: {construct}. torch.fx said: {text}",
                         f"{fix}; or capture with torch.export instead (capture='export', or 'auto' to fall back)")


def symbolic_trace(model: torch.nn.Module) -> fx.GraphModule:
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError... from user code
        raise explain_trace_failure(exc, tracer.failed_path or "", model) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _forward_of(model: torch.nn.Module) -> str:
    return f"{type(model).__name__}.forward"


def _check_loss_output(gm: fx.GraphModule) -> None:
    """The graph must return one tensor (the loss): a tuple, dict or ModelOutput cannot be trained."""
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    value = outputs[0].args[0] if outputs else None
    if not isinstance(value, fx.Node):
        raise PcompileError(f"the model's forward returns {type(value).__name__}, not the loss tensor",
                            "wrap the model: forward(inputs, targets) returns the scalar loss (for HuggingFace "
                            "models: `return self.model(x, labels=y, use_cache=False, return_dict=False)[0]`)")


def capture(model: torch.nn.Module, inputs: tuple, how: str) -> tuple[fx.GraphModule, str, list[str]]:
    """(graph module, path used, report lines)."""
    if how == "fx":
        return symbolic_trace(model), "fx", ["captured with torch.fx.symbolic_trace (forced: capture='fx')"]
    if how == "export":
        gm, notes = export_graph(model, inputs)
        return gm, "export", ["captured with torch.export (forced: capture='export')"] + notes
    try:
        traced = symbolic_trace(model)
    except PcompileError as fx_error:
        traced, fx_cause = None, fx_error.cause
        why = f"torch.fx.symbolic_trace failed: {fx_cause}"
    else:
        hidden = opaque_linears(traced)
        if not hidden:
            return traced, "fx", ["captured with torch.fx.symbolic_trace"]
        more = f" and {len(hidden) - 1} more" if len(hidden) > 1 else ""
        why = f"torch.fx keeps {hidden[0]}{more} as one call, whose Linears tensor parallelism could not split"
    try:
        gm, notes = export_graph(model, inputs)
    except PcompileError as export_error:
        if traced is not None:
            return traced, "fx", ["captured with torch.fx.symbolic_trace", f"{why}; torch.export failed "
                                  f"({export_error.cause}): those modules stay whole (no tp inside them)"]
        raise PcompileError(f"neither capture path works for {_forward_of(model)}.\n  torch.fx: {fx_cause}\n"
                            f"  torch.export: {export_error.cause}", export_error.fix) from export_error
    return gm, "export", [f"captured with torch.export because {why}"] + notes


def _refuse_eager_attention(model: torch.nn.Module, precision: str) -> None:
    """Hugging Face's eager attention adds a float mask made by a factory op given the dtype
    (`torch.full(..., torch.finfo(dtype).min, dtype=dtype)`): export records it at the capture's
    fp32, and under bf16 it promotes the scores, so the matmul with the bf16 values raises on
    the first step (pcompile.runtime.precision's rule covers casts, not factory ops). Refused
    at compile time, naming the module and the fix (the sdpa attention takes a boolean mask)."""
    for path, module in model.named_modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "eager":
            raise PcompileError(
                f"{path or 'the model'} ({type(module).__name__}) uses Hugging Face's eager attention "
                f"(config._attn_implementation='eager') under mixed_precision={precision!r}: torch.export records "
                "its float attention mask (torch.full(..., torch.finfo(dtype).min, dtype=dtype)) at the capture's "
                "fp32, which would promote the bf16 attention scores to fp32 and fail at the next matmul",
                "load the model with attn_implementation='sdpa' (from_pretrained(..., attn_implementation='sdpa') or "
                "its config's attn_implementation='sdpa'; the same attention, with a boolean mask), or compile in "
                "fp32 (mixed_precision=None)")


@register_pass("trace", kind="frontend", ensures=("captured",))
def trace(ir: IR | None, ctx: PassContext) -> IR:
    """Capture the model (fx, or torch.export when fx cannot); parameters keep their original names.
    Repeated blocks are captured once (pcompile.ir.replicate: the first three, the rest stitched)."""
    repeated = capture_repeated(ctx.model, lambda model: capture(model, ctx.example_inputs, ctx.options.capture))
    if repeated is not None:
        gm, how, notes, replicas = repeated
    else:
        (gm, how, notes), replicas = capture(ctx.model, ctx.example_inputs, ctx.options.capture), None
    _check_loss_output(gm)
    if how == "export" and ctx.options.mixed_precision is not None:
        _refuse_eager_attention(ctx.model, ctx.options.mixed_precision)
    ctx.report.extend(notes)
    return IR(gm=gm, capture=how, replicas=replicas)
