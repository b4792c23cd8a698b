"""FlexMoE's placement planner (pcompile.runtime.expert_placement): pure, no ranks."""
import pytest

from pcompile.runtime.expert_placement import ExpertPlacement, assign, propose, replica_counts

STATIC = ExpertPlacement.static(4, 4)


def test_static_placement_and_its_loads():
    assert ExpertPlacement.static(8, 4).describe() == "r0:[0, 1] r1:[2, 3] r2:[4, 5] r3:[6, 7]"
    assert STATIC.rank_loads([100, 100, 0, 0]) == [100.0, 100.0, 0.0, 0.0]
    assert STATIC.imbalance([100, 100, 0, 0]) == 2.0 and STATIC.imbalance([0, 0, 0, 0]) == 1.0


def test_two_hot_experts_are_replicated_and_the_cold_ones_moved():
    # T = 50: each hot expert split over two ranks, the cold ones fill the free slots
    placement = propose([100, 100, 0, 0], STATIC, capacity=2, threshold=1.0)
    assert placement.describe() == "r0:[0] r1:[0] r2:[1, 2] r3:[1, 3]"
    assert placement.holders == ((0, 1), (2, 3), (2,), (3,))
    assert placement.rank_loads([100, 100, 0, 0]) == [50.0, 50.0, 50.0, 50.0]


def test_capacity_without_spare_slots_only_moves():
    # ep2, 3 slots per rank: a move of two cold experts balances it, no replica needed
    placement = propose([100, 100, 0, 0], ExpertPlacement.static(4, 2), capacity=3, threshold=1.0)
    assert placement.describe() == "r0:[0] r1:[1, 2, 3]" and placement.imbalance([100, 100, 0, 0]) == 1.0
    # E/R slots: a permutation only ([90, 50, 40, 20]: 90+20 | 50+40 beats 90+50 | 40+20)
    moved = propose([90, 50, 40, 20], ExpertPlacement.static(4, 2), capacity=2, threshold=1.0)
    assert moved.describe() == "r0:[0, 3] r1:[1, 2]" and moved.capacity == 2


def test_more_replicas_are_not_always_better():
    # 4 ranks, 5 heavy shares under ceil(L/T) counts would put two on one rank: 2 + 2 replicas win
    loads = [400, 10, 10, 10, 300, 5, 5, 5]
    placement = propose(loads, ExpertPlacement.static(8, 4), capacity=3, threshold=1.1)
    assert placement.describe() == "r0:[0, 6] r1:[0, 7] r2:[1, 3, 4] r3:[2, 4, 5]"
    assert round(placement.imbalance(loads), 3) == 1.101  # from 2.201


def test_balanced_enough_is_left_alone():
    assert propose([30, 28, 25, 27], STATIC, capacity=2, threshold=1.25) is None
    # a skew the planner cannot improve on is left alone too (one expert, all load, 1 slot per rank)
    assert propose([10, 0, 0, 0], STATIC, capacity=1, threshold=1.0) is None


def test_dhondt_replica_counts_and_lpt_assignment():
    assert list(replica_counts([100, 100, 0, 0], 4, 2)) == [[1, 1, 1, 1], [2, 1, 1, 1], [2, 2, 1, 1],
                                                           [3, 2, 1, 1], [3, 3, 1, 1]]
    # ties keep experts where they are: the unskewed loads give back the static placement
    assert assign([5, 5, 5, 5], [1, 1, 1, 1], 4, 1, STATIC) == STATIC


def test_invalid_inputs_refused():
    with pytest.raises(ValueError, match="holders"):
        ExpertPlacement(((0,), (0, 0)), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        propose([1, 2, 3, 4], STATIC, capacity=0)
