"""Process groups for the rewritten graph, from the rank layout (pcompile.mesh): the
DeviceMesh a backend builds, and the binding of the axis names in collective nodes to this
rank's groups."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.device_mesh import DeviceMesh

from pcompile.mesh import rank_grid
from pcompile.runtime import ops


def bind_axes(gm: fx.GraphModule, keys: dict[str, str]) -> None:
    """Name this rank's process groups in every collective of `gm` and of the GraphModules nested
    in it (checkpoint regions, pipeline stages): axis name -> the key it is bound under."""
    touched = set()
    for module, node in ops.collectives_of(gm):
        axis, _ = ops.axis_of(node)
        if axis in keys:
            ops.with_axis(node, keys[axis])
            touched.add(module)
    for module in touched:
        module.recompile()


def device_mesh(device_type: str, pp: int, dp: int, tp: int, names: tuple[str, ...]) -> DeviceMesh:
    """Collective: the (pp, dp, tp) DeviceMesh of the rank layout (pcompile.mesh), pp dropped when
    `names` has no "pp"."""
    grid = torch.tensor(rank_grid(pp, dp, tp), dtype=torch.int)
    return DeviceMesh(device_type, grid if "pp" in names else grid[0], mesh_dim_names=names)
