"""Optimizers by name: bitsandbytes' 8-bit AdamW trains the tiny model on CPU; bad names are clear errors."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_params_changed, fit_tiny, trainable_snapshot
from lightning.pytorch.loggers import CSVLogger

from rftlab import GRPO, RolloutDataModule
from rftlab.models.optim import OPTIMIZERS, build_optimizer
from rftlab.tasks import Arithmetic

bnb = pytest.importorskip("bitsandbytes")


def test_adamw8bit_trains_the_tiny_model_with_8bit_state(tmp_path, tiny_grpo, vary_reward):
    module = tiny_grpo(optim={"optimizer": "adamw8bit"}, lr=1e-2)  # full fine-tuning: large tensors get 8-bit state
    before = trainable_snapshot(module)  # full fine-tuning: every parameter
    dm = RolloutDataModule(task=Arithmetic(num_test=2), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                           max_new_tokens=4)
    trainer = fit_tiny(module, dm, 2, tmp_path, logger=CSVLogger(tmp_path))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    embed = module.policy.get_input_embeddings().weight
    assert optimizer.state[embed]["state1"].dtype == torch.uint8, "the embedding's moments should be 8-bit"
    assert_params_changed(before, module)
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss/policy", "grad_norm", "lr"} <= set(header)


def test_adamw8bit_follows_adamw_closely():
    # Same parameters and gradients: 8-bit moments give nearly AdamW's update (Dettmers et al. 2022).
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(64, 128)) for _ in range(2)]
    grads = [torch.randn(64, 128) for _ in range(3)]
    for p in weights[1:]:
        p.data.copy_(weights[0].data)
    exact = build_optimizer("adamw", [weights[0]], lr=1e-2, weight_decay=0.0)
    eight = build_optimizer("adamw8bit", [weights[1]], lr=1e-2, weight_decay=0.0)
    start = weights[0].detach().clone()
    for g in grads:
        for p, opt in ((weights[0], exact), (weights[1], eight)):
            p.grad = g.clone()
            opt.step()
    step_exact, step_eight = weights[0].detach() - start, weights[1].detach() - start
    assert torch.nn.functional.cosine_similarity(step_exact.flatten(), step_eight.flatten(), dim=0) > 0.99
    assert eight.state[weights[1]]["state1"].dtype == torch.uint8


def test_optimizer_names_are_validated_at_construction():
    with pytest.raises(ValueError, match="optim.optimizer='adam9bit' is invalid: must be one of adamw, adamw8bit"):
        GRPO(policy="tiny", optim={"optimizer": "adam9bit"})
    assert {"adamw", "adamw8bit", "paged_adamw8bit"} <= set(OPTIMIZERS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="paged optimizers are allowed when a GPU is present")
def test_paged_optimizers_need_a_gpu():
    with pytest.raises(ValueError, match="optim.optimizer='paged_adamw8bit' .* needs a CUDA GPU"):
        GRPO(policy="tiny", optim={"optimizer": "paged_adamw8bit"})


def test_a_registered_optimizer_is_selectable_by_name(tiny_grpo):
    name = "sgd-test"

    @OPTIMIZERS.register(name, overwrite=True)
    def sgd(params, lr, weight_decay):
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)

    module = tiny_grpo(optim={"optimizer": name})
    assert isinstance(module.configure_optimizers()["optimizer"], torch.optim.SGD)
