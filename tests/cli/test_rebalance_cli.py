"""`pcompile run --rebalance-every N` is refused before any rank starts for plans that cannot
rebalance (the run itself is tested in tests/distributed/test_expert_parallel.py's launch)."""
import pytest

from pcompile import Plan, cli
from pcompile.backends.expert_rebalance import check_plan
from pcompile.errors import PcompileError


@pytest.mark.parametrize("plan, cause", [(Plan.uniform(dp=4), "has none"),
                                         (Plan.uniform(dp=2, pp=2, ep=2), "pipelined")])
def test_rebalancing_refused_without_ep_and_in_pipelines(plan, cause, tmp_path, capsys):
    with pytest.raises(PcompileError, match=cause) as refused:
        check_plan(plan, 2)
    assert refused.value.fix
    (tmp_path / "plan.json").write_text(plan.to_json())
    assert cli.main(["run", "tests/cli/moe_factory.py:moe", "--plan", str(tmp_path / "plan.json"), "--local", "4",
                     "--rebalance-every", "2"]) == 2
    assert cause in capsys.readouterr().err
    check_plan(plan, 0)  # off: nothing to refuse
