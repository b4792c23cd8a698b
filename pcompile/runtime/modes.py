"""Train and eval mode of a lowered graph. A captured graph has `self.training` baked into its
ops' arguments (fx reads it at trace time; torch.export records the train-mode ops): dropout's
`training` flag and probability, attention's dropout_p, batch norm's `training`. `set_training`
switches those arguments to what the model computes in eval mode (dropout off, batch norm on
its running statistics) and back, in every GraphModule of a module (checkpoint regions,
pipeline stages), and calls `train(mode)` on it so leaf modules (nn.Dropout, nn.BatchNorm*)
follow too."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from pcompile.runtime import batch_norm

aten = torch.ops.aten
_TRAIN_VALUE = "pcompile_train_value"  # node.meta: the argument's value in train mode (as captured)

# op -> (positional index, keyword, value in eval mode, the argument's default)
EVAL_ARGS = {
    F.dropout: (2, "training", False, True), F.dropout1d: (2, "training", False, True),
    F.dropout2d: (2, "training", False, True), F.dropout3d: (2, "training", False, True),
    F.alpha_dropout: (2, "training", False, False), aten.dropout.default: (2, "train", False, True),
    aten.native_dropout.default: (2, "train", False, True),
    F.scaled_dot_product_attention: (4, "dropout_p", 0.0, 0.0),
    aten.scaled_dot_product_attention.default: (4, "dropout_p", 0.0, 0.0),
    F.batch_norm: (5, "training", False, False), aten.batch_norm.default: (5, "training", False, False),
    aten._native_batch_norm_legit_functional.default: (5, "training", False, False),
    batch_norm.sync_batch_norm: (5, "training", False, False),
}


def _set(node: fx.Node, index: int, keyword: str, value) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, keyword: value}


def _get(node: fx.Node, index: int, keyword: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(keyword, default)


def set_training(module: torch.nn.Module, training: bool) -> None:
    """Put every graph of `module` in train (the captured arguments) or eval mode."""
    for gm in module.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        changed = False
        for node in gm.graph.nodes:
            rule = EVAL_ARGS.get(node.target) if node.op == "call_function" else None
            if rule is None:
                continue
            index, keyword, eval_value, default = rule
            if _TRAIN_VALUE not in node.meta:  # what the graph was captured with (train mode)
                node.meta[_TRAIN_VALUE] = _get(node, index, keyword, default)
            _set(node, index, keyword, node.meta[_TRAIN_VALUE] if training else eval_value)
            changed = True
        if changed:
            gm.recompile()
    module.train(training)
