"""The prompts of several data sets are taken in turn, so that a run's first (timed) prompts cover all of them."""

from effllm.experiments.prompts import round_robin


def test_round_robin_takes_each_group_in_turn_and_keeps_every_item():
    groups = [["a1", "a2", "a3"], ["b1"], ["c1", "c2"]]
    assert round_robin(groups) == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert sorted(round_robin(groups)) == sorted(sum(groups, []))
    assert round_robin([]) == [] and round_robin([[], ["x"]]) == ["x"]
