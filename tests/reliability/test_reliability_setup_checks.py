"""Setup-time checks: settings the task or the model cannot satisfy fail before anything is sampled.

- SegmentRFT's step critic declares the task columns it reads; a task without them is refused in
  setup, naming the column, the critic, the task and the columns the rows have.
- The prompt and completion budgets must fit the policy's context (``max_position_embeddings``),
  for every algorithm; the limit is read from the model's config, without loading weights.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from rftlab import DAPO, GRPO, PPO, RolloutDataModule, SegmentRFT
from rftlab.algorithms.base import RFTModule
from rftlab.rewards.critics import ArithmeticStepCritic, Critic, JudgeCritic
from rftlab.tasks import Arithmetic, RowsTask, WordProblems
from helpers import fit_tiny
from reliability_helpers import parity

REWARDS = {"parity": parity}
TINY_CONTEXT = 2048  # max_position_embeddings of the "tiny" policy's config


def _never_sample(*args, **kwargs):
    raise AssertionError("sampled before the configuration was checked")


def _recording_generate(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[tuple[int, ...]]:
    """Record (and still run) every ``generate`` call of ``cls``; returns the list of prompt shapes."""
    calls: list[tuple[int, ...]] = []
    original = cls.generate

    def generate(self, prompt_ids, *args, **kwargs):
        calls.append(tuple(prompt_ids.shape))
        return original(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(cls, "generate", generate)
    return calls


# ---- SegmentRFT: the critic's task columns ------------------------------------------------------

def test_segment_rft_on_a_task_without_step_columns_fails_in_setup_before_sampling(monkeypatch):
    calls = _recording_generate(monkeypatch, SegmentRFT)
    module = SegmentRFT(policy="tiny", lora=True, lr=1e-2)
    dm = RolloutDataModule(task=Arithmetic(num_test=0), prompts_per_step=1, num_generations=2, max_new_tokens=4)
    with pytest.raises(ValueError) as info:
        fit_tiny(module, dm, 1)
    message = str(info.value)
    assert calls == [], "a completion was sampled before the missing column was reported"
    for text in ("'steps'", "arithmetic_steps", "ArithmeticStepCritic", "task 'arithmetic'",
                 "'a'", "'answer'", "'b'", "'op'", "'prompt'"):
        assert text in message, f"{text} not in: {message}"


def test_a_custom_steps_column_is_the_one_required():
    module = SegmentRFT(policy="tiny", lora=True, step_critic=ArithmeticStepCritic(steps_key="trace"))
    dm = RolloutDataModule(task=WordProblems(num_test=0), prompts_per_step=1, num_generations=2, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"'trace'.*task 'word_problems'"):
        module.check_datamodule(dm)


def test_every_row_of_an_in_memory_task_is_checked():
    rows = [{"prompt": "1 + 1?", "answer": "2", "steps": [2]}, {"prompt": "2 + 2?", "answer": "4"},
            {"prompt": "3 + 3?", "answer": "6", "steps": [6]}]
    module = SegmentRFT(policy="tiny", lora=True)
    dm = RolloutDataModule(task=RowsTask(rows, rewards=REWARDS, name="mine"), prompts_per_step=1, num_generations=2)
    with pytest.raises(ValueError, match=r"'steps' \(absent from 1 of the 3 training rows checked\).*task 'mine'"):
        module.check_datamodule(dm)


def test_a_task_with_the_critic_columns_passes_the_check():
    module = SegmentRFT(policy="tiny", lora=True)
    dm = RolloutDataModule(task=WordProblems(num_test=0), prompts_per_step=1, num_generations=2, max_new_tokens=4)
    module.check_datamodule(dm)  # no error


def test_critics_declare_the_columns_they_need():
    assert Critic.required_columns == ()
    assert ArithmeticStepCritic().required_columns == ("answer", "steps")
    assert ArithmeticStepCritic(answer_key="y", steps_key="trace").required_columns == ("y", "trace")
    # The judge reads its reference solution when the row has one, and works without it.
    assert JudgeCritic(lambda messages: ["" for _ in messages]).required_columns == ()


# ---- the context length of the policy ----------------------------------------------------------

@pytest.mark.parametrize("cls", [GRPO, DAPO, PPO, SegmentRFT], ids=lambda c: c.__name__)
def test_prompt_plus_completion_past_the_context_fails_in_setup(cls, monkeypatch):
    monkeypatch.setattr(cls, "generate", _never_sample)
    module = cls(policy="tiny", lora=True)
    dm = RolloutDataModule(task=WordProblems(num_test=0), rewards=REWARDS, prompts_per_step=2, num_generations=2,
                           max_prompt_length=2000, max_new_tokens=100)
    with pytest.raises(ValueError) as info:
        fit_tiny(module, dm, 1)
    message = str(info.value)
    for text in ("max_prompt_length=2000", "max_new_tokens=100", "2100", str(TINY_CONTEXT), "'tiny'"):
        assert text in message, f"{text} not in: {message}"


def test_a_validation_budget_past_the_context_is_named():
    module = GRPO(policy="tiny")
    dm = RolloutDataModule(task=WordProblems(num_test=2), rewards=REWARDS, num_generations=2, max_prompt_length=1000,
                           max_new_tokens=8, val_max_new_tokens=1100)
    with pytest.raises(ValueError, match=r"max_prompt_length=1000 \+ val_max_new_tokens=1100 = 2100 .*2048"):
        module.check_datamodule(dm)


def test_budgets_within_the_context_pass():
    module = GRPO(policy="tiny")
    dm = RolloutDataModule(task=WordProblems(num_test=2), rewards=REWARDS, num_generations=2, max_prompt_length=2000,
                           max_new_tokens=48)
    module.check_datamodule(dm)  # 2048 tokens: exactly the context


def test_the_built_policy_gives_the_limit_when_it_exists():
    module = GRPO(policy="tiny", lora=True)
    module.configure_model()
    module.policy.config.max_position_embeddings = 64  # what a short-context model would say
    dm = RolloutDataModule(task=WordProblems(num_test=0), rewards=REWARDS, num_generations=2, max_prompt_length=60,
                           max_new_tokens=8)
    with pytest.raises(ValueError, match=re.escape("max_prompt_length=60 + max_new_tokens=8 = 68")):
        module.check_datamodule(dm)


def test_without_prompt_truncation_the_completion_budget_alone_is_checked():
    module = GRPO(policy="tiny")
    sampling = SimpleNamespace(max_new_tokens=3000)
    datamodule = SimpleNamespace(encoder=SimpleNamespace(max_prompt_length=None), sampling=sampling,
                                 val_sampling=sampling)
    with pytest.raises(ValueError, match=r"max_new_tokens=3000 .*2048"):
        RFTModule.check_datamodule(module, datamodule)


def test_model_context_length_reads_the_config_only(tmp_path):
    from transformers import LlamaConfig

    from rftlab.models.loading import model_context_length

    LlamaConfig(max_position_embeddings=321).save_pretrained(tmp_path)  # a folder with no weights
    assert model_context_length(str(tmp_path)) == 321
    assert model_context_length("tiny") == TINY_CONTEXT
    assert model_context_length("default") == 8192
