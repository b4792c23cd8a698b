"""onnx.reference implementations of the pcompile-domain ops that backends/onnx.py writes, so an
exported rank's graph can be evaluated (tests compare it, node by node, with torch)."""
from __future__ import annotations

import numpy as np

from pcompile.backends.onnx import DOMAIN


def reference_ops():
    """onnx.reference implementations of the pcompile ops as one rank sees them without peers
    (the semantics of `pcompile.runtime.collectives.simulate()`): copy/reduce are identities, gather
    repeats the local shard, scatter keeps chunk `rank_in_group`; the batch regrouping ops are
    the same gather / scatter along the batch dim, and SdpGather repeats each shard along its dim."""
    from onnx.reference.op_run import OpRun

    class TpCopy(OpRun):
        op_domain = DOMAIN

        def _run(self, x, **attrs):
            return (x.copy(),)

    class TpReduce(TpCopy):
        pass

    class TpGather(OpRun):
        op_domain = DOMAIN

        def _run(self, x, dim=None, group_size=None, **attrs):
            return (np.concatenate([x] * group_size, axis=dim),)

    class TpScatter(OpRun):
        op_domain = DOMAIN

        def _run(self, x, dim=None, group_size=None, rank_in_group=None, **attrs):
            return (np.array_split(x, group_size, axis=dim)[rank_in_group].copy(),)

    class SpSplit(TpScatter):
        pass

    class BatchGather(TpGather):
        pass

    class BatchSlice(TpScatter):
        pass

    class SpReduceScatter(TpScatter):  # alone, the sum over the group is this rank's own partial sum
        pass

    class SpGather(TpGather):
        pass

    class SpUnsplit(TpGather):
        pass

    class SdpGather(OpRun):
        op_domain = DOMAIN

        def _run(self, *shards, dims=None, group_size=None, **attrs):
            return tuple(np.concatenate([shard] * group_size, axis=dim) for shard, dim in zip(shards, dims))

    class VocabEmbedding(OpRun):  # this rank's rows [start, start + rows); other ids give zeros
        op_domain = DOMAIN

        def _run(self, ids, weight, start=None, **attrs):
            outside = (ids < start) | (ids >= start + weight.shape[0])
            out = weight[np.where(outside, 0, ids - start)]
            out[outside] = 0
            return (out,)

    class VocabParallelCrossEntropy(OpRun):  # alone, the sums over the group are this rank's own
        op_domain = DOMAIN

        def _run(self, logits, target, start=None, ignore_index=None, reduction=None, **attrs):
            rows = logits.reshape(-1, logits.shape[-1]) if logits.ndim == 1 else \
                np.moveaxis(logits, 1, -1).reshape(-1, logits.shape[1])
            flat = target.reshape(-1)
            shifted = rows - rows.max(axis=-1, keepdims=True)
            outside = (flat < start) | (flat >= start + rows.shape[-1])
            picked = np.take_along_axis(shifted, np.where(outside, 0, flat - start)[:, None], -1)[:, 0]
            kept = flat != ignore_index
            loss = np.where(kept, np.log(np.exp(shifted).sum(-1)) - np.where(outside, 0, picked), 0)
            reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
            if reduction == "none":
                return (loss.reshape(target.shape).astype(logits.dtype),)
            total = loss.sum() / (kept.sum() if reduction == "mean" else 1)
            return (np.array(total, dtype=logits.dtype),)

    return [TpCopy, TpReduce, TpGather, TpScatter, SpSplit, SpReduceScatter, SpGather, SpUnsplit, BatchGather,
            BatchSlice, SdpGather, VocabEmbedding, VocabParallelCrossEntropy]
