"""Curriculum: stages by prompt count, each stage's rows shuffled on their own, each row scored by its stage."""

from __future__ import annotations

import pickle

import pytest
import torch

from rftlab import RolloutDataModule
from rftlab.rewards import RewardSet
from rftlab.tasks import Curriculum, RowsTask
from rftlab.tasks.curriculum import STAGE_COLUMN, StagedReward


def _stage(tag: str, n: int, score: float, test: bool = False) -> RowsTask:
    """Rows "tag0".."tag{n-1}"; its reward scores every completion ``score`` (so a score names its stage)."""
    rows = [{"prompt": f"{tag}{i}", "answer": f"{tag}{i}"} for i in range(n)]
    held_out = [{"prompt": f"{tag}-test{i}", "answer": "x"} for i in range(3)] if test else None
    return RowsTask(rows, rewards={"correct": lambda completions, s=score, **_: [s] * len(completions)},
                    test=held_out, name=tag)


def test_stage_at_counts_prompts_and_the_last_stage_goes_on():
    c = Curriculum([_stage("a", 5, 0.0), _stage("b", 5, 0.5), _stage("c", 5, 1.0)], stage_prompts=[3, 2])
    got = [c.stage_at(p) for p in range(8)]
    assert got == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]


@pytest.mark.parametrize("stages, stage_prompts, words", [
    (1, [], "at least 2"),
    (2, [], "one per stage but the last"),
    (2, [3, 4], "one per stage but the last"),
    (2, [0], "must be >= 1"),
])
def test_bad_arguments_name_the_parameter(stages, stage_prompts, words):
    tasks = [_stage(t, 3, 0.0) for t in "abc"[:stages]]
    with pytest.raises(ValueError, match=words):
        Curriculum(tasks, stage_prompts=stage_prompts)


def test_stages_must_name_the_same_rewards():
    other = RowsTask([{"prompt": "q"}], rewards={"format": lambda completions, **_: [0.0] * len(completions)})
    with pytest.raises(ValueError, match=r"stages\[0\] names the reward functions \['format'\]"):
        Curriculum([other, _stage("b", 3, 1.0)], stage_prompts=[2])


def test_the_datamodule_draws_stage_by_stage_each_stage_shuffled():
    c = Curriculum([_stage("a", 4, 0.0), _stage("b", 6, 1.0)], stage_prompts=[6])
    dm = RolloutDataModule(task=c, prompts_per_step=2, seed=3)
    drawn = [r["answer"] for r in dm.next_prompt_rows(18)]
    easy, hard = drawn[:6], drawn[6:]
    assert all(a.startswith("a") for a in easy) and all(b.startswith("b") for b in hard)
    # each stage runs through its rows once per epoch of its own, in a shuffled order
    assert sorted(easy[:4]) == ["a0", "a1", "a2", "a3"] and easy[:4] != ["a0", "a1", "a2", "a3"]
    assert sorted(hard[:6]) == sorted(hard[6:12]) == [f"b{i}" for i in range(6)]
    rows = dm.next_prompt_rows(1)
    assert rows[0][STAGE_COLUMN] == 1


def test_a_task_without_stages_draws_as_before():
    """The order of a plain task is a per-epoch randperm seeded seed * 1000003 + epoch."""
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(7)]
    dm = RolloutDataModule(task=RowsTask(rows, rewards={"r": lambda completions, **_: [0.0] * len(completions)}),
                           prompts_per_step=1, seed=5)
    drawn = [int(r["answer"]) for r in dm.next_prompt_rows(14)]
    expected = [int(i) for e in range(2) for i in torch.randperm(7, generator=torch.Generator().manual_seed(5 * 1_000_003 + e))]
    assert drawn == expected


def test_resume_continues_the_curriculum_where_it_stopped():
    c = Curriculum([_stage("a", 4, 0.0), _stage("b", 6, 1.0)], stage_prompts=[5])
    dm = RolloutDataModule(task=c, prompts_per_step=2, seed=1)
    dm.next_prompt_rows(4)
    state = dm.state_dict()
    rest = [r["answer"] for r in dm.next_prompt_rows(6)]
    again = RolloutDataModule(task=c, prompts_per_step=2, seed=1)
    again.load_state_dict(state)
    assert [r["answer"] for r in again.next_prompt_rows(6)] == rest
    assert rest[0].startswith("a") and all(a.startswith("b") for a in rest[1:])


def test_each_row_is_scored_by_its_own_stage_and_held_out_rows_by_the_last():
    c = Curriculum([_stage("a", 3, 0.25), _stage("b", 3, 0.5), _stage("c", 3, 1.0, test=True)], stage_prompts=[1, 1])
    reward = c.reward_functions()["correct"]
    assert isinstance(reward, StagedReward)
    scores = reward(["x", "y", "z", "w"], answer=["1", "2", "3", "4"], **{STAGE_COLUMN: [2, 0, 1, 0]})
    assert scores == [1.0, 0.25, 0.5, 0.25]
    assert reward(["x"], answer=["1"]) == [1.0], "no stage column (held-out rows): the last stage"
    assert c.test_rows() == c.stages[-1].test_rows()
    assert c.is_correct("x", c.test_rows()[0]) and not c.is_correct("x", {**c.train_rows()[0]})


def test_stage_rewards_see_only_their_rows_columns():
    seen = []

    def spy(completions, answer, **_):
        seen.append(list(answer))
        return [1.0] * len(completions)

    stages = [RowsTask([{"prompt": "p", "answer": "a"}], rewards={"r": spy}) for _ in range(2)]
    Curriculum(stages, stage_prompts=[1]).reward_functions()["r"](["x", "y", "z"], answer=["a1", "b1", "a2"],
                                                                  **{STAGE_COLUMN: [0, 1, 0]})
    assert seen == [["a1", "a2"], ["b1"]]


def test_an_easier_stage_never_trains_on_a_held_out_question():
    easy = RowsTask([{"prompt": f"q{i}", "answer": str(i)} for i in range(4)],
                    rewards={"correct": lambda completions, **_: [0.0] * len(completions)})
    hard = RowsTask([{"prompt": "h0"}], rewards={"correct": lambda completions, **_: [0.0] * len(completions)},
                    test=[{"prompt": "q1"}, {"prompt": "q2"}])
    c = Curriculum([easy, hard], stage_prompts=[8])
    prompts = [row["prompt"] for row in c.stage_rows(0)]
    assert prompts == ["q0", "q3", "q3", "q3"], "q1 and q2 are held out: the next row of the stage stands in"
    with pytest.raises(ValueError, match="every training row of curriculum stage 0"):
        Curriculum([easy, RowsTask([{"prompt": "h"}], rewards=hard.reward_functions(),
                                   test=[{"prompt": f"q{i}"} for i in range(4)])], stage_prompts=[1]).stage_rows(0)[0]


def test_rows_index_like_a_list():
    c = Curriculum([_stage("a", 2, 0.0), _stage("b", 3, 1.0)], stage_prompts=[1])
    rows = c.train_rows()
    assert len(rows) == 5 and [r["prompt"] for r in rows[:]] == ["a0", "a1", "b0", "b1", "b2"]
    assert rows[-1]["prompt"] == "b2" and c.stage_rows(1)[-3]["prompt"] == "b0"
    assert [r[STAGE_COLUMN] for r in rows] == [0, 0, 1, 1, 1]
    for bad in (5, -6):
        with pytest.raises(IndexError):
            rows[bad]
    with pytest.raises(IndexError):
        c.stage_rows(0)[2]


def test_stage_rewards_must_be_plain_callables():
    from rftlab.rewards.pool import WithTimeout

    async def slow(completions, **_):
        return [0.0] * len(completions)

    for fn in (slow, WithTimeout(lambda completions, **_: [0.0] * len(completions), timeout=1.0)):
        odd = RowsTask([{"prompt": "q"}], rewards={"correct": fn})
        with pytest.raises(ValueError, match=r"stages\[0\]'s reward 'correct' is async or wrapped in WithTimeout"):
            Curriculum([odd, _stage("b", 3, 1.0)], stage_prompts=[1])


class _Counting:
    """A reward that keeps its own counters, as MathAnswer (timeouts) and the graders (counters) do."""

    counters = ("unparsed",)

    def __init__(self) -> None:
        self.timeouts = 0
        self.unparsed = 0

    def __call__(self, completions, **_):
        self.timeouts += 1
        self.unparsed += len(completions)
        return [0.0] * len(completions)


def test_the_stages_own_counters_reach_the_reward_set():
    first, last = _Counting(), _Counting()
    stages = [RowsTask([{"prompt": "p", "answer": "a"}], rewards={"r": fn}) for fn in (first, last)]
    staged = Curriculum(stages, stage_prompts=[1]).reward_functions()["r"]
    assert staged.counters == ("unparsed",) and staged.timeouts == 0
    result = RewardSet({"r": staged}).score(["x", "y", "z"], ["p"] * 3,
                                       [{"answer": "a", STAGE_COLUMN: s} for s in (0, 1, 0)])
    # each stage ran once (one timeout each, by its own count) and saw its own rows (2 + 1 unparsed)
    assert result.timeouts == {"r": 2} and result.counts == {"r": {"unparsed": 3}}
    assert (first.unparsed, last.unparsed) == (2, 1)
    assert pickle.loads(pickle.dumps(staged)).timeouts == 2, "a process pool's copy counts the same way"
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        staged.missing
