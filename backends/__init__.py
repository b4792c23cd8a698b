"""Backends lower a rewritten IR to something that runs (installed as pcompile.backends):
`distributed` (this rank's module on torch.distributed process groups, gradient sync, full
views), `pipeline` (pipelined plans on torch.distributed.pipelining schedules), `groups` (the
DeviceMesh and axis binding, from pcompile.mesh), `layer_groups` (plans whose layers use other
(dp, tp) groupings), `onnx` (each rank's graph as ONNX).

Contract: backends read the IR's typed facts and the runtime's op registry; they import no
pass."""
from pcompile.backends.distributed import CompiledModel

__all__ = ["CompiledModel"]
