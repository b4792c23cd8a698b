"""The IR: a torch.fx GraphModule with typed metadata (pcompile.ir.graph), fake-tensor runs
over it (pcompile.ir.fake) and the pass manager that runs passes over it (pcompile.ir.pass_manager)."""
from pcompile.ir.graph import IR, META_KEY, SYMBOLIC_KEY, NodeMeta, ParamSharding, reads_inputs, take_shards, target_name

__all__ = ["IR", "META_KEY", "SYMBOLIC_KEY", "NodeMeta", "ParamSharding", "reads_inputs", "take_shards", "target_name"]
