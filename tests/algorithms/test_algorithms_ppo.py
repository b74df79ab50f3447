"""PPO: token-level rewards, the adaptive KL controller, the three critic layouts, training on the tiny
model (weights change, metrics reach W&B, the KL state is checkpointed), value warm-up, memory."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import assert_params_changed, assert_params_unchanged, fit_tiny, trainable_snapshot
from lightning.pytorch.loggers import WandbLogger
from torch.testing import assert_close

from rftlab import PPO, CriticOptions, RolloutDataModule
from rftlab.algorithms.ppo import AdaptiveKLController, token_level_rewards
from rftlab.core import selective_log_softmax
from rftlab.tasks import Arithmetic
from wandb_records import complete, find_run_files, finish_offline_run, read_history

SHARED_METRICS = [
    "reward/mean", "reward/std", "reward/parity/mean", "kl", "entropy", "grad_norm", "clip_ratio/low",
    "clip_ratio/high", "completions/mean_length", "completions/clipped_ratio", "frac_reward_zero_std",
    "loss/policy", "lr", "timing/generate", "timing/train", "tokens_per_second/generate", "val/accuracy",
]
PPO_METRICS = [
    "loss/value", "value/clip_ratio", "value/mean", "value/explained_variance", "returns/mean",
    "advantages/mean", "advantages/std", "approx_kl", "kl_coef", "reward/kl_penalty", "loss/total",
]


def make_ppo(**kwargs) -> PPO:
    defaults = dict(policy="tiny", lr=1e-2, lora=True, log={"validate_at_start": False})
    module = PPO(**{**defaults, **kwargs})
    module.configure_model()
    return module


def make_dm(vary_reward, **kwargs) -> RolloutDataModule:
    defaults = dict(task=Arithmetic(num_test=0), rewards=vary_reward, prompts_per_step=2, num_generations=2,
                    max_new_tokens=5)
    return RolloutDataModule(**{**defaults, **kwargs})


def perturb_lora(module, name_part=".default."):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name and name_part in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(advantage={"options": {"gamma": 1.5}}), r"advantage\.options\.gamma=1.5 is invalid: must be in \[0, 1\]"),
        (dict(advantage={"options": {"lam": -0.1}}), r"advantage\.options\.lam=-0.1 is invalid: must be in \[0, 1\]"),
        (dict(critic={"vf_coef": -1.0}), r"critic\.vf_coef=-1.0 is invalid: must be >= 0"),
        (dict(loss={"entropy_coef": -0.1}), r"loss\.entropy_coef"),
        (dict(critic={"value_clip": -0.2}), r"critic\.value_clip"),
        (dict(clip={"eps_low": 0.2, "eps_high": 0.1}), r"clip\.eps_high"),
        (dict(critic={"kind": "twin"}), r"critic\.kind='twin' is invalid: must be one of 'shared', 'adapter', 'model'"),
        (dict(critic={"kind": "adapter"}, lora=False), r"critic\.kind='adapter' is invalid.*lora=True"),
        (dict(critic={"kind": "shared", "model": "tiny"}), r"critic\.model='tiny' is invalid"),
        (dict(kl={"target": 1.0}, beta=0.0), "beta=0.0 is invalid: must be > 0 with an adaptive KL target"),
        (dict(kl={"target": -1.0}, beta=0.1), r"kl\.target"),
        (dict(kl={"target": 1.0, "horizon": 0}, beta=0.1), r"kl\.horizon"),
        (dict(critic={"warmup_steps": -1}), r"critic\.warmup_steps"),
        (dict(critic={"lr": 0.0}), r"critic\.lr"),
        (dict(loss={"agg": "mean"}), r"loss\.agg='mean' is invalid"),
        (dict(kl={"estimator": "k4"}), r"kl\.estimator='k4' is invalid: must be one of k1, k2, k3"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPO(policy="tiny", **kwargs)


def test_num_iterations_below_one_is_rejected_by_the_datamodule(vary_reward):
    with pytest.raises(ValueError, match="num_iterations must be an integer >= 1, got 0"):
        make_dm(vary_reward, num_iterations=0)


def test_separate_critic_with_another_tokenizer_is_rejected(tmp_path, tokenizer):
    other = tmp_path / "other-tokenizer"
    tokenizer.save_pretrained(other)
    from transformers import AutoTokenizer

    changed_tokenizer = AutoTokenizer.from_pretrained(other)
    changed_tokenizer.add_tokens(["<critic-only-token>"])
    changed_tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match=r"critic\.model=.*tokenizer differs from policy='tiny'"):
        PPO(policy="tiny", critic={"kind": "model", "model": str(other)})
    same = tmp_path / "same-tokenizer"
    tokenizer.save_pretrained(same)
    assert PPO(policy="tiny", critic=CriticOptions(kind="model", model=str(same))).hparams.critic.model == str(same)


def test_reference_is_needed_exactly_when_a_kl_coefficient_is_set():
    assert PPO(policy="tiny", beta=0.05, kl={"in_reward": True}).needs_reference
    assert PPO(policy="tiny", beta=0.05, kl={"in_reward": False}).needs_reference
    assert not PPO(policy="tiny", beta=0.0).needs_reference


# ---------------------------------------------------------------- pure functions

def test_token_level_rewards_hand_computed():
    scores = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    kl = torch.tensor([[0.1, -0.2, 0.3], [0.4, 9.0, 9.0], [5.0, 5.0, 5.0]])
    # no KL: the score on the last real token (row 0: t = 2, row 1: t = 0; row 2 has none)
    assert_close(token_level_rewards(scores, mask), torch.tensor([[0.0, 0.0, 1.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    # kl_coef 0.5: r_t = -0.5 kl_t on real tokens, + score on the last one
    # row 0: [-0.05, 0.1, -0.15 + 1] ; row 1: [-0.2 - 0.5] ; padding stays 0 whatever kl holds
    expected = torch.tensor([[-0.05, 0.1, 0.85], [-0.7, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(token_level_rewards(scores, mask, kl, kl_coef=0.5), expected)


def test_token_level_rewards_match_a_reference_loop():
    gen = torch.Generator().manual_seed(0)
    n, t = 6, 8
    lengths = torch.randint(0, t + 1, (n,), generator=gen)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    scores = torch.randn(n, generator=gen, dtype=torch.float64)
    kl = torch.randn(n, t, generator=gen, dtype=torch.float64)
    got = token_level_rewards(scores, mask, kl, kl_coef=0.3)
    expected = torch.zeros(n, t, dtype=torch.float64)
    for i in range(n):
        for j in range(int(lengths[i])):
            expected[i, j] = -0.3 * float(kl[i, j]) + (float(scores[i]) if j == int(lengths[i]) - 1 else 0.0)
    assert_close(got, expected)
    with pytest.raises(ValueError, match="kl_coef"):
        token_level_rewards(scores, mask, kl, kl_coef=-1.0)


def test_adaptive_kl_controller_hand_computed():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=100)
    # KL 9 vs target 6: error 9/6 - 1 = 0.5, clipped to 0.2; 10 sequences: beta *= 1 + 0.2 * 10/100
    assert ctl.update(9.0, 10) == pytest.approx(0.1 * 1.02)
    # KL 4.5: error 4.5/6 - 1 = -0.25 -> -0.2; beta *= 1 - 0.2 * 50/100 = 0.9
    assert ctl.update(4.5, 50) == pytest.approx(0.1 * 1.02 * 0.9)
    # KL 6.6: error 0.1 (inside the clip); beta *= 1 + 0.1 * 100/100
    assert ctl.update(6.6, 100) == pytest.approx(0.1 * 1.02 * 0.9 * 1.1)
    other = AdaptiveKLController(0.1, 6.0, 100)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value


# ---------------------------------------------------------------- scoring a rollout

def test_rollout_records_old_values_and_log_probs_and_builds_gae_targets(vary_reward):
    beta = 0.2
    module = make_ppo(beta=beta, advantage={"name": "gae", "options": {"gamma": 1.0, "lam": 1.0}},
                      critic={"whiten_advantages": False})
    perturb_lora(module)  # policy != reference, so the KL penalty is not zero
    dm = make_dm(vary_reward, num_iterations=2).attach(module)
    rollout = dm.build_rollout()
    mask = rollout.completion_mask.float()
    with torch.no_grad():
        module.policy.eval()
        logits, values = module.policy_and_values(rollout)
        fresh_logp = selective_log_softmax(logits, rollout.completion_ids)
        ref_logp = module.batched_logprobs(rollout, reference=True)
    assert_close(rollout.values * mask, values * mask, atol=1e-5, rtol=1e-5)  # from the sampling policy
    assert_close(rollout.old_logp * mask, fresh_logp * mask, atol=1e-5, rtol=1e-5)
    k1 = (rollout.old_logp - ref_logp) * mask
    assert k1.abs().sum() > 0
    # gamma = lam = 1: the return of token t is the score minus beta times the KL still to come,
    # R_t = score - beta * sum_{t' >= t} k1_t'; advantages are R_t - V_t (not whitened)
    to_come = k1.flip(1).cumsum(1).flip(1)
    expected_returns = (rollout.rewards.unsqueeze(1) - beta * to_come) * mask
    assert_close(rollout.returns, expected_returns, atol=1e-5, rtol=1e-5)
    assert_close(rollout.advantages, (expected_returns - rollout.values) * mask, atol=1e-5, rtol=1e-5)
    stats = rollout.metrics  # per-rollout statistics travel with the rollout, logged at every step it feeds
    assert stats["reward/kl_penalty"] == pytest.approx((beta * k1.sum(1)).mean().item(), rel=1e-4)


def test_whitened_advantages_and_no_log_prob_forward_when_not_needed(vary_reward):
    module = make_ppo()
    rollout = make_dm(vary_reward, prompts_per_step=4).attach(module).build_rollout()
    assert rollout.old_logp is None, "one update, no KL: the current log-probs serve as old ones"
    mask = rollout.completion_mask.bool()
    assert rollout.advantages[mask].mean().item() == pytest.approx(0.0, abs=1e-5)
    assert rollout.advantages[mask].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    assert torch.count_nonzero(rollout.advantages[~mask]) == 0


def test_the_three_critic_layouts_route_the_value_gradient(vary_reward):
    rollout = None
    initial = {}
    for critic in ("shared", "adapter", "model"):
        module = make_ppo(critic={"kind": critic})
        if rollout is None:
            rollout = make_dm(vary_reward).attach(module).build_rollout()
        _, values = module.policy_and_values(rollout)
        initial[critic] = values.detach()
        (values * rollout.completion_mask).pow(2).sum().backward()
        policy_grads = [p.grad for n, p in module.policy.named_parameters() if ".default." in n]
        critic_grads = [p.grad for p in module.critic_parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in critic_grads[:1]), critic
        trunk_gets_value_grad = any(g is not None and g.abs().sum() > 0 for g in policy_grads)
        # Only the shared trunk trains the policy's adapter through the value loss.
        assert trunk_gets_value_grad == (critic == "shared"), critic
        if critic != "shared":
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.critic_parameters()[2:]), critic
    # Same seed: the separate critic starts as a copy of the policy and a fresh critic adapter is
    # the identity (LoRA B = 0), so all three layouts give the same initial values.
    assert_close(initial["adapter"], initial["shared"])
    assert_close(initial["model"], initial["shared"])


def test_critic_adapter_never_changes_the_policy(vary_reward):
    module = make_ppo(critic={"kind": "adapter"})
    rollout = make_dm(vary_reward).attach(module).build_rollout()
    with torch.no_grad():
        logits_before = module.policy_logits(rollout)
        values_before = module.policy_and_values(rollout)[1]
        perturb_lora(module, ".critic.")
        logits_after, values_after = module.policy_and_values(rollout)
    assert torch.equal(logits_before, logits_after), "policy forward must use the policy adapter only"
    assert not torch.allclose(values_before, values_after)
    assert module.policy.active_adapter == "default"
    ids = module.generate(rollout.prompt_ids[:1], rollout.prompt_mask[:1], 1,
                                make_dm(vary_reward).sampling)[0]
    assert module.policy.active_adapter == "default" and ids.shape[0] == 1
    # one loss trains both adapters: the policy's through the PPO loss, the critic's through the value loss
    module.zero_grad()
    module.compute_loss(rollout)[0].backward()
    for adapter in (".default.", ".critic."):
        grads = [p.grad for n, p in module.policy.named_parameters() if adapter in n and "lora_B" in n]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), adapter


def test_loss_terms_add_up_with_entropy_bonus_and_kl_in_the_loss(vary_reward):
    module = make_ppo(beta=0.3, kl={"in_reward": False}, loss={"entropy_coef": 0.01}, critic={"vf_coef": 0.5})
    perturb_lora(module)
    rollout = make_dm(vary_reward).attach(module).build_rollout()
    loss, m = module.compute_loss(rollout)
    # token-mean aggregation: the entropy term is the logged masked mean entropy
    expected = m["loss/policy"] + 0.5 * m["loss/value"] - 0.01 * m["entropy"] + 0.3 * m["loss/kl"]
    assert_close(loss.detach(), expected)
    assert m["loss/kl"] > 0 and "reward/kl_penalty" not in m and "reward/kl_penalty" not in rollout.metrics


# ---------------------------------------------------------------- training

def test_ppo_fit_changes_policy_and_critic_and_logs_every_metric(tmp_path, vary_reward):
    module = make_ppo(beta=0.05, kl={"target": 0.5, "horizon": 50}, log={"validate_at_start": True})
    lora_before = trainable_snapshot(module.policy)
    head_before = trainable_snapshot(module.value_head)  # every value-head parameter trains
    dm = make_dm(vary_reward, task=Arithmetic(num_test=2), num_iterations=2, num_minibatches=2, val_batch_size=2)
    logger = WandbLogger(project="rftlab-tests", save_dir=str(tmp_path), offline=True)
    trainer = fit_tiny(module, dm, 4, tmp_path, logger=logger, val_check_interval=4, limit_val_batches=None,
                       num_sanity_val_steps=2)
    finish_offline_run()
    assert_params_changed(lora_before, module.policy, require="any")
    assert_params_changed(head_before, module.value_head, require="any")

    history = read_history(complete(find_run_files(tmp_path)[0]))
    logged: dict[str, list[float]] = {}
    for row in history:
        for key, value in row.items():
            logged.setdefault(key, []).append(value)
    for key in SHARED_METRICS + PPO_METRICS:
        assert key in logged, f"{key} never reached W&B; logged: {sorted(logged)}"
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in logged[key]), (key, logged[key])
    assert len(logged["loss/value"]) == 4
    # Step 1 is on-policy (ratio 1, values equal old values); later minibatches of the same
    # rollout follow an update, so the policy has moved away from the one that sampled.
    assert logged["approx_kl"][0] == pytest.approx(0.0, abs=1e-6)
    assert max(logged["approx_kl"][1:]) > 0
    # the adaptive coefficient moved after the rollout (4 sequences, horizon 50)
    assert module.kl_coef != 0.05 and logged["kl_coef"][0] == pytest.approx(0.05)

    path = tmp_path / "ppo.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["kl_controller"]["value"] == module.kl_coef
    assert any(k.startswith("value_head.") for k in checkpoint["state_dict"])
    restored = make_ppo(beta=0.05, kl={"target": 0.5, "horizon": 50})
    restored.on_load_checkpoint(checkpoint)
    assert restored.kl_coef == module.kl_coef


@pytest.mark.parametrize("critic", ["shared", "model"])
def test_value_warmup_trains_only_the_critic(vary_reward, critic):
    module = make_ppo(critic={"kind": critic, "warmup_steps": 2, "lr": 5e-2})
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainable_snapshot(module.policy), trainable_snapshot(module.value_head)))

    start_policy, start_head = trainable_snapshot(module.policy), trainable_snapshot(module.value_head)
    fit_tiny(module, make_dm(vary_reward), 3, callbacks=[Watch()])
    after_warmup_policy, after_warmup_head = seen[1]
    assert_params_unchanged(start_policy, after_warmup_policy, message="the policy moved during the value warm-up")
    assert_params_changed(start_head, after_warmup_head, require="any")
    assert_params_changed(start_policy, seen[2][0], require="any", message="the policy trains after the warm-up")
    lrs = [group["lr"] for group in module.trainer.optimizers[0].param_groups]
    assert lrs == [1e-2, 5e-2]


def _storage_bytes(tensors) -> tuple[set[int], int]:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return set(storages), sum(storages.values())


def test_shared_critic_holds_one_copy_of_the_base_weights():
    def extra_bytes(module):
        base = module.policy.get_base_model()
        base_tensors = [p for n, p in base.named_parameters() if "lora_" not in n] + list(base.buffers())
        base_ptrs, base_bytes = _storage_bytes(base_tensors)
        all_ptrs, all_bytes = _storage_bytes(list(module.parameters()) + list(module.buffers()))
        assert base_ptrs <= all_ptrs
        return all_bytes - base_bytes, base_bytes

    shared = make_ppo(critic={"kind": "shared"})
    extra, base_bytes = extra_bytes(shared)
    trainable = sum(p.numel() * p.element_size() for p in shared.parameters() if p.requires_grad)
    assert shared.critic is None and shared.ref_policy is None
    # beyond the base weights, the process holds only the trainable LoRA weights and the value head
    assert extra == trainable and extra < 0.1 * base_bytes
    # the check can fail: a separate critic model is a second copy of the base weights
    separate_extra, _ = extra_bytes(make_ppo(critic={"kind": "model"}))
    assert separate_extra > base_bytes
