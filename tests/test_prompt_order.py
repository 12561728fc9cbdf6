"""The prompts of several data sets are taken in turn, so that a run's first (timed) prompts cover all of them."""

from effllm.experiments.prompts import round_robin


def test_round_robin_takes_each_group_in_turn_and_keeps_every_item():
    groups = [["a1", "a2", "a3"], ["b1"], ["c1", "c2"]]
    assert round_robin(groups) == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert sorted(round_robin(groups)) == sorted(sum(groups, []))
    assert round_robin([]) == [] and round_robin([[], ["x"]]) == ["x"]


def test_tasks_joined_by_plus_take_turns_and_builtin_is_arithmetic_plus_humaneval():
    from effllm.experiments.prompts import task_prompts
    from effllm.models import load_model

    _, tokenizer = load_model("smollm2-135m")
    mixed = task_prompts(tokenizer, "arithmetic+humaneval+docstrings", 7, offset=3)
    assert [p.task for p in mixed] == ["arithmetic", "humaneval", "docstrings"] * 2 + ["arithmetic"]
    assert [p.index for p in mixed] == [1, 1, 1, 2, 2, 2, 3]
    builtin = task_prompts(tokenizer, "builtin", 4)
    assert [(p.task, p.index) for p in builtin] == [(p.task, p.index) for p in
                                                    task_prompts(tokenizer, "arithmetic+humaneval", 4)]
    import pytest
    with pytest.raises(ValueError, match="prompt data"):
        task_prompts(tokenizer, "arithmetic+nothing", 2)
