"""The passes (installed as pcompile.passes), one file each, every one `(ir, ctx) -> ir` with the
facts it requires and ensures (pcompile.ir.pass_manager). Importing this package registers
them all, and the invariant the rewrites keep (passes/invariants.py).

Helper modules that are not passes: export (torch.export capture, for trace), search_runs (the
engine runs of the search pass), invariants."""
from pcompile.passes import (
    activation_checkpoint,
    batch_statistics,
    expert_parallel,
    flops,
    invariants,
    layers,
    loss_check,
    memory,
    normalise_loss,
    operator_split,
    pipeline_split,
    reshard,
    search,
    sequence_parallel,
    shapes,
    sharded_data_parallel,
    symbolic,
    tensor_parallel,
    trace,
)

__all__ = ["activation_checkpoint", "batch_statistics", "expert_parallel", "flops", "invariants", "layers",
           "loss_check", "memory", "normalise_loss", "operator_split", "pipeline_split", "reshard", "search",
           "sequence_parallel", "shapes", "sharded_data_parallel", "symbolic", "tensor_parallel", "trace"]
