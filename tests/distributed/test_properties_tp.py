"""Hypothesis-generated MLP/GPT configs x (dp, tp) factorisations of 4 ranks on gloo: the
rewritten program's loss and full gradients equal the serial model's (fp32, 1e-5). All
examples run inside ONE 4-rank launch; every rank draws the same examples (see
ranks_properties)."""
import pcompile
from tests.distributed.ranks_properties import EXPLICIT, run_properties

TOLERANCE = 1e-5
EXAMPLES = 10


def test_random_configs_and_factorisations_match_serial():
    per_rank = pcompile.launch(run_properties, 4, EXAMPLES)
    cases = [[r["case"] for r in records] for records in per_rank]
    assert all(c == cases[0] for c in cases), "ranks drew different examples"
    assert len(cases[0]) == EXAMPLES + len(EXPLICIT)
    plans = {case.split(" dp=")[1].split(" batch")[0] for case in cases[0]}
    assert plans == {"4 tp=1", "2 tp=2", "1 tp=4"}, plans
    for records in per_rank:
        for r in records:
            assert r["loss_diff"] < TOLERANCE, r
            assert r["grad_diff"] < TOLERANCE, r
            if "tp=1" not in r["case"]:
                assert r["tp_nodes"] > 0, r
