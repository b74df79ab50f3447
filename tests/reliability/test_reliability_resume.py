"""Exact resume: N steps == N/2 steps + resume from the checkpoint + N/2 steps, for every algorithm.

Each configuration makes a piece of saved state matter: LoRA dropout (the random generators),
several minibatches per rollout and a checkpoint in the middle of one (the pending minibatches),
warm-up (the scheduler), dynamic sampling, the adaptive KL controller and the critic (PPO),
SegmentRFT's stale pi_rollout snapshot, multi-turn episodes (their environments live only
within a rollout; the pending minibatches carry the environment tokens and masks).
"""

from __future__ import annotations

import pytest
import torch

from rftlab import DAPO, GRPO, PPO, RolloutDataModule, SegmentRFT
from rftlab.tasks import Arithmetic, WordProblems
from rftlab.environments import TryAgain
from reliability_helpers import assert_same_weights, fit, length_score, parity, talkative

CASES = {
    # 1 iteration x 2 minibatches = 2 steps per rollout: the checkpoint at step 3 is mid-rollout.
    "grpo": (
        lambda: GRPO(policy={"model": "tiny", "lora_dropout": 0.2}, lr=1e-2, lora=True, beta=0.05,
                     optim={"warmup_steps": 2}, log={"validate_at_start": False}),
        lambda: RolloutDataModule(task=Arithmetic(num_test=0), rewards={"parity": parity}, prompts_per_step=2,
                                  num_generations=4, max_new_tokens=6, num_minibatches=2),
    ),
    # Full fine-tuning, dynamic sampling on a reward that often ties, overlong shaping.
    "dapo": (
        lambda: DAPO(policy="tiny", lr=1e-3, overlong={"buffer_len": 2}, log={"validate_at_start": False}),
        lambda: RolloutDataModule(task=Arithmetic(num_test=0), rewards={"len3": length_score}, prompts_per_step=2,
                                  num_generations=3, max_new_tokens=4, max_gen_batches=3, num_minibatches=2),
    ),
    "ppo": (
        lambda: PPO(policy={"model": "tiny", "lora_dropout": 0.1}, lr=1e-2, lora=True, beta=0.05,
                    kl={"in_reward": True, "target": 0.01, "horizon": 20}, log={"validate_at_start": False}),
        lambda: RolloutDataModule(task=Arithmetic(num_test=0), rewards={"parity": parity}, prompts_per_step=2,
                                  num_generations=2, max_new_tokens=5, num_iterations=2, num_minibatches=2),
    ),
    # pi_rollout re-synced every 2 rollouts: the checkpoint at step 3 holds a stale snapshot.
    "segment_rft": (
        lambda: SegmentRFT(policy="tiny", lr=5e-2, lora=True, segments={"rollout_sync_every": 2}, beta=0.02,
                           log={"validate_at_start": False}),
        lambda: RolloutDataModule(task=WordProblems(num_test=0), rewards={"parity": parity}, prompts_per_step=2,
                                  num_generations=2, max_new_tokens=8),
    ),
    # Multi-turn: "try again" episodes of up to 3 turns, 2 minibatches per rollout.
    "grpo_multi_turn": (
        lambda: talkative(GRPO)(policy="tiny", lr=1e-2, lora=True, log={"validate_at_start": False}),
        lambda: RolloutDataModule(task=Arithmetic(num_test=0), rewards={"parity": parity}, prompts_per_step=2,
                                  num_generations=3, max_new_tokens=24, num_minibatches=2,
                                  environment=TryAgain(Arithmetic(num_test=0), max_attempts=3), max_turns=3),
    ),
}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted 6-step run of a case (built once), with checkpoints after steps 3 and 6."""
    runs = {}

    def get(name):
        if name not in runs:
            folder = tmp_path_factory.mktemp(f"straight-{name}")
            module, record = fit(*CASES[name], 6, folder, every=3, keep=-1)
            runs[name] = (module, record, folder)
        return runs[name]

    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_equals_an_uninterrupted_run(name, straight_run, tmp_path):
    straight, record, folder = straight_run(name)
    # Resume from the checkpoint written after step 3 (a fresh module, DataModule, Trainer and seed).
    resumed, second = fit(*CASES[name], 6, tmp_path, ckpt_path=str(folder / "step=3.ckpt"))

    assert sorted(second.rewards) == [4, 5, 6], "the resumed run continues at step 4"
    assert all(second.rewards[s] == record.rewards[s] for s in (4, 5, 6)), (second.rewards, record.rewards)
    for step in (4, 5, 6):  # what reached the logger, not only what was sampled
        assert second.logged[step]["reward/mean"] == record.logged[step]["reward/mean"]
    assert_same_weights(resumed, straight)
    if name == "ppo":
        assert resumed.kl_coef == straight.kl_coef != 0.05  # the controller moved and was restored
    if name == "segment_rft":
        assert resumed._rollout_version == straight._rollout_version
    if name == "grpo_multi_turn":  # the episodes did have several turns
        assert max(record.logged[s]["episodes/turns_mean"] for s in (1, 2, 3, 4, 5, 6)) > 1


def test_resume_state_is_what_makes_it_exact(straight_run, tmp_path):
    """Without the saved random generators and pending minibatches the resumed run diverges
    (guards against a test that would pass whatever the checkpoint holds)."""
    straight, _, folder = straight_run("grpo")
    checkpoint = torch.load(folder / "step=3.ckpt", weights_only=True)
    assert len(checkpoint["RolloutDataModule"]["queue"]) == 1, "one minibatch of the rollout is pending"
    checkpoint["RolloutDataModule"]["queue"] = []
    del checkpoint["rftlab"]
    torch.save(checkpoint, tmp_path / "stripped.ckpt")
    resumed, _ = fit(*CASES["grpo"], 6, tmp_path, ckpt_path=str(tmp_path / "stripped.ckpt"))
    diffs = [(a - b).abs().max().item() for a, b in zip(resumed.parameters(), straight.parameters())]
    assert max(diffs) > 1e-4
