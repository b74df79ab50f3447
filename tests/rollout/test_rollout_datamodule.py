"""RolloutDataModule: validation, prompt stream, rollout contents, state, on-policy ordering."""

from __future__ import annotations


import lightning as L
import pytest
import torch
from helpers import fit_tiny

from rftlab import RolloutDataModule
from rftlab.rollout.prompts import PromptEncoder
from rftlab.tasks import Arithmetic, RowsTask


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(prompts_per_step=0), "prompts_per_step"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_iterations=0), "num_iterations"),
        (dict(num_minibatches=5, prompts_per_step=4), "num_minibatches"),
        (dict(max_gen_batches=0), "max_gen_batches"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=2.0), "top_p"),
        (dict(max_prompt_length=0), "max_prompt_length"),
        (dict(prompt_truncation="middle"), "prompt_truncation"),
        (dict(reward_on_error="ignore"), "on_error"),
        (dict(on_short_batch="wait"), "on_short_batch"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RolloutDataModule(task=Arithmetic(), **kwargs)


def test_empty_task_is_rejected():
    class Empty(Arithmetic):
        def train_rows(self):
            return []

    with pytest.raises(ValueError, match="no training prompts"):
        RolloutDataModule(task=Empty())


def test_prompt_truncation_left_warns_and_error_raises(tokenizer):
    long_prompt = "word " * 50
    encoder = PromptEncoder(max_prompt_length=8, truncation="left")
    with pytest.warns(UserWarning, match="max_prompt_length=8"):
        texts, ids, mask = encoder.encode([long_prompt, "short"], tokenizer)
    assert ids.shape[1] == 8 and mask[0].sum() == 8
    full = tokenizer(long_prompt, add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == full[-8:]  # the END of the prompt is kept
    with pytest.raises(ValueError, match="max_prompt_length"):
        PromptEncoder(max_prompt_length=8, truncation="error").encode([long_prompt], tokenizer)


def test_chat_prompts_are_rendered_with_the_template(tokenizer):
    texts, ids, mask = PromptEncoder().encode([[{"role": "user", "content": "Hi"}]], tokenizer)
    assert texts[0].startswith("<|im_start|>") and texts[0].endswith("<|im_start|>assistant\n")


def test_rollout_contents(tiny_grpo, vary_reward):
    module = tiny_grpo()
    dm = RolloutDataModule(task=Arithmetic(), rewards=vary_reward, prompts_per_step=2, num_generations=3,
                           max_new_tokens=6).attach(module)
    r = dm.build_rollout()
    assert len(r) == 6 and r.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert r.prompts[0] == r.prompts[2] != r.prompts[3]
    assert r.rows[0]["answer"] == r.rows[2]["answer"]
    assert r.rewards.tolist() == [float(len(c) % 2 == 0) for c in r.completions]
    assert r.advantages.shape == r.completion_mask.shape
    assert r.old_logp is None, "num_iterations == 1: no extra forward for old log-probs"
    assert r.ref_logp is None, "beta == 0: no reference forward"
    m = r.metrics
    for key in ("reward/mean", "reward/std", "reward/parity/mean", "completions/mean_length",
                "completions/clipped_ratio", "frac_reward_zero_std", "timing/generate", "timing/reward"):
        assert key in m
    assert m["completions/mean_length"] == pytest.approx(r.completion_mask.sum(1).float().mean().item())


def test_old_and_ref_logprobs_when_needed(tiny_grpo, vary_reward):
    module = tiny_grpo(beta=0.1, lora=True)
    dm = RolloutDataModule(task=Arithmetic(), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                           max_new_tokens=5, num_iterations=2).attach(module)
    r = dm.build_rollout()
    assert r.old_logp is not None and r.ref_logp is not None
    # A fresh LoRA adapter is zero-initialised: policy == reference.
    torch.testing.assert_close(r.old_logp * r.completion_mask, r.ref_logp * r.completion_mask)
    batches = [dm.next_minibatch() for _ in range(2)]
    assert not dm._queue


def test_seeded_sampling_is_reproducible(tiny_grpo, vary_reward):
    out = []
    for _ in range(2):
        module = tiny_grpo()
        dm = RolloutDataModule(task=Arithmetic(), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                               max_new_tokens=6, seed=7).attach(module)
        out.append(dm.build_rollout().completion_ids)
    assert torch.equal(out[0], out[1])


def test_state_dict_round_trip_resumes_the_prompt_stream(tiny_grpo):
    task = Arithmetic()
    dm = RolloutDataModule(task=task, prompts_per_step=2)
    first = [r["answer"] for r in dm.next_prompt_rows(5)]
    state = dm.state_dict()
    nxt = [r["answer"] for r in dm.next_prompt_rows(5)]
    dm2 = RolloutDataModule(task=task, prompts_per_step=2)
    dm2.load_state_dict(state)
    assert [r["answer"] for r in dm2.next_prompt_rows(5)] == nxt
    assert first != nxt


def test_ranks_get_disjoint_prompts(monkeypatch):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)]
    task = RowsTask(rows, rewards={"r": lambda completions, **_: [0.0] * len(completions)})
    seen = []
    for rank in range(2):
        dm = RolloutDataModule(task=task, prompts_per_step=2)
        monkeypatch.setattr(RolloutDataModule, "world_size", property(lambda self: 2))
        monkeypatch.setattr(RolloutDataModule, "rank", property(lambda self, r=rank: r))
        seen.append([row["answer"] for row in dm.next_prompt_rows(5)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(str(i) for i in range(10))


def test_every_rollout_is_sampled_by_the_policy_it_trains(tiny_grpo, vary_reward):
    """On-policy: the rollout trained at step t was sampled after update t-1 (no pre-fetch)."""
    module = tiny_grpo()
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, batch.policy_version))

    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                           max_new_tokens=4)
    fit_tiny(module, dm, 4, callbacks=[Spy()])
    assert seen == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_minibatches_of_one_rollout_share_its_policy_version(tiny_grpo, vary_reward):
    module = tiny_grpo()
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, batch.policy_version, len(batch)))

    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                           max_new_tokens=4, num_minibatches=2, num_iterations=2)
    fit_tiny(module, dm, 8, callbacks=[Spy()])
    # 2 iterations x 2 minibatches = 4 steps per rollout; each minibatch is one group of G=4.
    assert [v for _, v, _ in seen] == [0, 0, 0, 0, 4, 4, 4, 4]
    assert all(n == 4 for _, _, n in seen)


def test_reward_errors_and_timeouts_are_counted_in_the_rollout_metrics(tiny_grpo):
    import time as _time

    def fragile(completions, **_):
        return [1.0 / (i % 2) for i in range(len(completions))]  # every even sample raises

    def slow(completions, **_):
        _time.sleep(0.5)
        return [1.0] * len(completions)

    module = tiny_grpo()
    dm = RolloutDataModule(task=Arithmetic(), rewards={"fragile": fragile}, reward_on_error="zero",
                           prompts_per_step=2, num_generations=2, max_new_tokens=3).attach(module)
    metrics = dm.build_rollout().metrics
    # called one sample at a time after the batch call fails: each single call sees i = 0 and raises
    assert metrics["reward/fragile/errors"] == 4.0
    dm = RolloutDataModule(task=Arithmetic(), rewards={"slow": slow}, reward_timeout=0.05,
                           prompts_per_step=1, num_generations=2, max_new_tokens=3).attach(module)
    metrics = dm.build_rollout().metrics
    assert metrics["reward/slow/timeouts"] == 2.0
    assert metrics["reward/mean"] == 0.0


def test_str_and_repr_describe_the_settings_without_a_policy():
    # Lightning's DataModule __str__ builds the dataloaders, which need a policy: it used to raise.
    from rftlab import RolloutDataModule
    from rftlab.tasks import Arithmetic

    dm = RolloutDataModule(task=Arithmetic(num_test=0), prompts_per_step=3, num_generations=5, max_new_tokens=7)
    text = str(dm)
    assert text == repr(dm)
    for part in ("task='arithmetic'", "prompts_per_step=3", "num_generations=5", "max_new_tokens=7", "rewards=['correct']"):
        assert part in text
