"""ZeRO-3 hides its communication behind compute (pcompile/runtime/sdp.py's schedule), on 4 gloo
ranks with every collective taking L = 40 ms (latency.inject) and each of 4 GPT blocks 40 ms of
compute forward, 80 ms backward (a sleep: the same on a loaded machine). Of the 14 ZeRO-3
collectives of a step (5 all-gathers: the tied embedding/head unit and 4 blocks; 4 re-gathers;
5 reduce-scatters), one block ahead hides 9: 3 forward all-gathers (the next block's, behind
this one), 3 re-gathers (the next block backward reaches, behind this one's backward) and 3
reduce-scatters (behind the previous block's backward). Each of the three alone hides 3 L; the
test wants more than 7 L against the same step serialized (sdp.serialized(): every collective
waited where it is issued), so it fails when any one of them does not overlap."""
import pcompile
from tests.distributed.ranks_sdp import overlap

LATENCY_MS = 40.0


def test_zero3_step_overlaps_gathers_and_reduce_scatters_with_compute():
    for r in pcompile.launch(overlap, 4, LATENCY_MS, LATENCY_MS, 4, 2):
        saved = r["serialized"] - r["overlapped"]
        assert saved > 7 * LATENCY_MS / 1e3, r
        assert r["same_grads"], r  # the same ops and sums, only issued earlier
        assert r["pending"] == 0, r  # every reduce-scatter waited inside backward, every prefetch taken
        # checkpointed blocks: their recompute re-gathers (prefetched) but issues no forward prefetch again
        assert r["all_gathers"]["overlapped"] == r["all_gathers"]["serialized"] == 5 + 4, r
