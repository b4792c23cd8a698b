"""The IR layer: a torch.fx GraphModule whose nodes carry typed metadata (`graph`), how values
and parameters are laid out over the mesh (`placement`), parameter names and aliases
(`params`), fake-tensor runs of a graph (`fake`), and the pass manager (`pass_manager`).

Contract: everything above the IR (sharding rules, the cost model, passes, backends) reads and
writes graph facts through these types only; this layer imports nothing of pcompile but the
plain data modules (errors, plan, cluster, mesh, options).
"""
from pcompile.ir.graph import (
                               IR,
                               META_KEY,
                               LossCounts,
                               MixedLayout,
                               NodeMeta,
                               PipelineSplit,
                               Stage,
                               reads_inputs,
                               target_name,
)
from pcompile.ir.placement import REPLICATED, Partial, Placement, Shard, local_shape

__all__ = ["IR", "META_KEY", "LossCounts", "MixedLayout", "NodeMeta", "PipelineSplit", "Stage", "reads_inputs",
           "target_name", "REPLICATED", "Partial", "Placement", "Shard", "local_shape"]
