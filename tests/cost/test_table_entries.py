"""pricing.table_entries folds a layer's memory into the table's (state, act, temp) cells: a
stage is charged sum(state) + sum(act) + max(temp), which must never be below what the runtime
holds at any moment of the step (schedules.backward_peak's walk through backward, then the
optimizer step)."""
from __future__ import annotations

import random

import pytest

from pcompile.cost.pricing import LayerCost, LayerMemory, table_entries
from pcompile.search.schedules import backward_peak


def charged(memories: list[LayerMemory], foreach: bool) -> float:
    cells = [table_entries(LayerCost(0.0, 0.0, 0.0, 0.0, m), foreach)[3:] for m in memories]
    return sum(state + act for state, act, _ in cells) + max(temp for _, _, temp in cells)


@pytest.mark.parametrize("seed", range(40))
def test_gradients_made_in_backward_are_charged_at_least_the_walk(seed):
    rng = random.Random(seed)
    foreach = rng.random() < 0.5
    memories = [LayerMemory(params=rng.uniform(0, 4), grads=rng.uniform(0, 4), optimizer=rng.uniform(0, 8),
                            activations=rng.uniform(0, 8), temp=rng.uniform(0, 3), step_temp=rng.uniform(0, 2),
                            grads_in_backward=True) for _ in range(rng.randint(1, 6))]
    assert charged(memories, foreach) >= backward_peak(memories, foreach=foreach) - 1e-9


def test_gradients_the_size_of_the_activations_are_charged_as_the_walk_finds_them():
    """Walking backward, each layer's gradients replace the activations of the one after it:
    the peak is at the first layer backward reaches, every activation and its gradients held."""
    memories = [LayerMemory(params=1.0, grads=2.0, optimizer=2.0, activations=2.0, temp=0.5,
                            grads_in_backward=True) for _ in range(4)]
    assert charged(memories, foreach=False) == backward_peak(memories, foreach=False) == 4 * 3.0 + 4 * 2.0 + 2.0 + 0.5
    # charged from backward's start (dp's buckets, accumulation): every layer's gradients on top
    early = [LayerMemory(params=1.0, grads=2.0, optimizer=2.0, activations=2.0, temp=0.5) for _ in range(4)]
    assert charged(early, foreach=False) == 4 * 5.0 + 4 * 2.0 + 0.5
