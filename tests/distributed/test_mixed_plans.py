"""Plans whose layers use different (dp, tp) groupings inside one stage == serial: loss after
each of 3 AdamW steps and all full gradients within 1e-5 (fp32), for tp2 -> tp4 -> tp1 on the
4-block GPT (tied head read at two dp degrees), dp vs sdp across groupings, mixing with
checkpointing, a residual MLP, blocks that start with a column Linear, a tied table read by a
ZeRO-3 and a plain layer of one grouping around blocks of another, and ZeRO-3 with tp off
the default grouping; that last plan also saves a checkpoint that loads back exactly (into the
same plan and into the serial model). All in one 4-rank launch."""
import torch

import pcompile
from pcompile import checkpoint
from tests.distributed.ranks_mixed import CASES, run_all

TOLERANCE = 1e-5
PARAM_TOLERANCE = 3 * 1e-2  # Adam on ~0 gradients, see test_equivalence.py


def _equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_mixed_plans_match_serial_and_checkpoint(tmp_path):
    per_rank = pcompile.launch(run_all, 4, list(range(len(CASES))), str(tmp_path))
    assert len(per_rank) == 4
    for result in per_rank:
        assert len(result["cases"]) == len(CASES)
        for r in result["cases"]:
            assert r["loss_diff"] < TOLERANCE, r
            assert r["grad_diff"] < TOLERANCE, r
            assert r["param_diff"] < PARAM_TOLERANCE, r
        saved = result["checkpoint"]
        assert saved["step"] == 2
        _equal(saved["loaded"], saved["saved"])
        _equal(saved["loaded_optim"], saved["saved_optim"])
    full = checkpoint.load_full(str(tmp_path))
    _equal({name: full[name] for name in per_rank[0]["checkpoint"]["saved"]}, per_rank[0]["checkpoint"]["saved"])
