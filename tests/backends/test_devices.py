"""An export capture of a model that builds position ids and rotary tables (Llama) holds CPU
device constants; follow_device puts every one on the rank's device (here "meta", a device
that is not the CPU) and leaves the graph alone on the CPU."""
import torch

import pcompile
from pcompile.backends.devices import follow_device
from tests.models import zoo


def _devices(gm) -> set:
    found = set()
    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                found |= {v for v in (*node.args, *node.kwargs.values()) if isinstance(v, torch.device)}
    return found


def test_export_device_constants_follow_the_rank_device():
    torch.manual_seed(0)
    cm = pcompile.compile(zoo.llama(), pcompile.Cluster.local(1), zoo.token_batch(0))
    assert _devices(cm.gm) == {torch.device("cpu")}  # what torch.export recorded
    assert follow_device(cm.gm, torch.device("cpu")) == 0
    changed = follow_device(cm.gm, torch.device("meta"))
    assert changed >= 5 and _devices(cm.gm) == {torch.device("meta")}
