"""Front end: capture an nn.Module into an fx GraphModule, turning fx's failures into
errors that name the module path, the construct, and the fix."""
from __future__ import annotations

import torch
import torch.fx as fx

from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.passmanager import PassContext, register_pass


class _PathTracer(fx.Tracer):
    """fx's tracer, remembering the module path being traced when something fails."""

    def __init__(self):
        super().__init__()
        self.current_path = ""

    def call_module(self, m, forward, args, kwargs):
        previous, self.current_path = self.current_path, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
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
    elif "Proxy" in text or "must be tuple of ints" in text or "int" in text:
        construct = "a tensor size used as a plain Python int (e.g. torch.ones(T, T) or buf[:T, :T] with T from x.shape)"
        fix = "build masks and index ranges from torch.arange on the input's device, or register the module as a leaf"
    else:
        construct = "an operation torch.fx cannot record symbolically"
        fix = "register the module as a leaf, or pass capture='export' to use torch.export"
    return PcompileError(f"cannot trace {where}: {construct}. torch.fx said: {text}", fix)


def symbolic_trace(model: torch.nn.Module) -> fx.GraphModule:
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError... from user code
        raise explain_trace_failure(exc, tracer.current_path, model) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


@register_pass("trace", kind="frontend")
def trace(ir: IR | None, ctx: PassContext) -> IR:
    """Capture the model with torch.fx.symbolic_trace (parameters keep their original names)."""
    if ctx.capture not in ("auto", "fx"):
        raise PcompileError(f"capture={ctx.capture!r} is not available yet", "use capture='fx' or 'auto'")
    gm = symbolic_trace(ctx.model)
    ctx.report.append("captured with torch.fx.symbolic_trace")
    return IR(gm=gm, capture="fx")
