"""Random streams' coordinates (backends/random_streams.py), without ranks: a layer's
degree-named axes group one pipeline stage's ranks, so ranks holding different batch parts of
a layer at another (dp, tp) draw from different streams in every stage, tp peers from one."""
import pcompile
from pcompile.backends.random_streams import stream_coordinate
from pcompile.plan import LayerAssignment, Strategy


def test_degree_named_axes_are_stage_local_in_pipelines():
    plan = pcompile.Plan(num_devices=8, default=Strategy(dp=2, tp=2), pp=2,
                         layers=(LayerAssignment("blocks.1", Strategy(dp=4)),))
    coords = {axis: [stream_coordinate(r, axis, 8, plan) for r in range(8)] for axis in ("dp4", "dp", "tp", "pp")}
    assert coords["dp4"] == [0, 1, 2, 3] * 2  # over all 8 ranks it would be [0, 0, 1, 1, 2, 2, 3, 3]
    assert coords["dp"] == [0, 0, 1, 1] * 2 and coords["tp"] == [0, 1] * 4 and coords["pp"] == [0] * 4 + [1] * 4
    assert len({(coords["dp4"][r], coords["pp"][r]) for r in range(8)}) == 8  # every rank its own dp4 stream
    flat = pcompile.Plan(num_devices=4, default=Strategy(dp=2, tp=2), layers=plan.layers)
    assert [stream_coordinate(r, "dp4", 4, flat) for r in range(4)] == [0, 1, 2, 3]

