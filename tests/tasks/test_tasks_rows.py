"""RowsTask and held-out scoring: the verifier sees the same arguments as in training."""

from __future__ import annotations

import pytest

from rftlab import RolloutDataModule
from rftlab.rollout.evaluation import score_answers
from rftlab.rollout.sampler import SamplingParams
from rftlab.tasks import RowsTask

seen_prompts: list[list[str]] = []


def names_the_prompt_length(completions: list[str], *, prompts: list[str], answer: list[str]) -> list[float]:
    """A reward that needs ``prompts``: 1.0 when the completion contains the prompt's length."""
    seen_prompts.append(list(prompts))
    return [float(str(len(p)) in c) for c, p in zip(completions, prompts)]


def test_is_correct_passes_the_prompt_like_training_does():
    task = RowsTask([{"prompt": "abcd", "answer": "x"}], rewards={"len": names_the_prompt_length})
    row = task.train_rows()[0]
    assert task.is_correct("it is 4", row)  # default: the raw prompt (4 characters)
    assert not task.is_correct("it is 5", row)
    assert task.is_correct("it is 7", row, prompt="<p>abcd")  # the rendered prompt text wins
    assert seen_prompts[-1] == ["<p>abcd"]


def test_held_out_scoring_gives_the_verifier_the_rendered_prompts(tiny_grpo):
    rows = [{"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"},
            {"prompt": [{"role": "user", "content": "Say hi"}], "answer": "hi"}]
    task = RowsTask(rows, rewards={"len": names_the_prompt_length}, test=rows)
    dm = RolloutDataModule(task=task, prompts_per_step=1, num_generations=2, max_new_tokens=3)
    module = tiny_grpo()
    seen_prompts.clear()
    batch = score_answers(dm, module, rows, SamplingParams(max_new_tokens=3, greedy=True))
    assert batch.correct.shape == (2,)
    # Called by is_correct (one row at a time) and by the RewardSet (the batch): always rendered text.
    rendered = [p for call in seen_prompts for p in call]
    assert rendered and all(p in batch.prompts for p in rendered)
    # Chat messages arrive rendered with the chat template, as in training.
    assert all(isinstance(p, str) and ("1 + 1" in p or "Say hi" in p) and "<|im_start|>" in p for p in rendered)


def test_rows_without_a_prompt_are_refused():
    with pytest.raises(ValueError, match="no 'prompt' column"):
        RowsTask([{"answer": "1"}], rewards={"len": names_the_prompt_length})
