"""Plans whose layers use different (dp, tp) groupings inside one stage (tp2 -> tp4 -> tp1,
dp vs sdp across layers, with checkpointing) == serial: loss after each of 3 AdamW steps and
all full gradients within 1e-5 (fp32), on the built-in GPT (tied head) and the residual MLP.
All plans run inside one 4-rank launch."""
import pcompile
from tests.distributed.ranks_mixed import CASES, compare_cases

TOLERANCE = 1e-5
PARAM_TOLERANCE = 3 * 1e-2  # Adam on ~0 gradients, see test_equivalence.py


def test_mixed_plans_match_serial():
    per_rank = pcompile.launch(compare_cases, 4, list(range(len(CASES))))
    assert len(per_rank) == 4
    for results in per_rank:
        assert len(results) == len(CASES)
        for r in results:
            assert r["loss_diff"] < TOLERANCE, r
            assert r["grad_diff"] < TOLERANCE, r
            assert r["param_diff"] < PARAM_TOLERANCE, r
