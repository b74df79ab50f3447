"""SFT: supervised fine-tuning on a task's reference solutions, the warm-up before RFT.

The usual recipe trains the policy on demonstrations first and starts RL from that checkpoint
(InstructGPT, Ouyang et al. 2022, arXiv 2203.02155, sec. 3.5; DeepSeek-R1's "cold start",
arXiv 2501.12948, sec. 2.3.1): RL then refines a policy that already answers in the expected form.

``SFTDataModule`` (``rftlab.rollout.references``) turns each task row into (prompt, reference completion + EOS) and hands ``SFT``
the same ``Rollout`` batch every algorithm trains on, so the module only adds its loss: the
negative log-likelihood of the completion tokens (the prompt carries no loss). Validation (held-out
accuracy through ``generate``), checkpoints, LoRA/QLoRA and optimizers are the base module's.
Start any algorithm from the result with ``init_checkpoint=<the .ckpt>`` (or ``policy=`` a folder
written by ``rftlab export``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rftlab.algorithms.base import RFTModule, _require
from rftlab.core import AGGREGATIONS, aggregate, masked_mean, selective_log_softmax_and_entropy
from rftlab.rollout.references import SFTDataModule, reference_text, right_pad
from rftlab.rollout.rollout import Rollout

__all__ = ["SFT", "SFTDataModule", "reference_text", "right_pad"]


class SFT(RFTModule):
    """Supervised fine-tuning on reference completions (loss on completion tokens only).

    Args:
        loss_agg: aggregation of the per-token NLL: "token-mean" (every target token weighs the same,
            the usual SFT loss) or "seq-mean-token-mean" (every example weighs the same); any name
            of ``rftlab.core.AGGREGATIONS``.
        **kwargs: ``RFTModule`` options (policy, lora, lr, forward, optim, log); ``beta`` must stay 0
            (no reference term).
    """

    trains_on_references = True  # what SFTDataModule checks (see rftlab.rollout.protocol)

    def __init__(self, loss_agg: str = "token-mean", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _require(loss_agg in AGGREGATIONS, "loss_agg", loss_agg, f"one of {', '.join(AGGREGATIONS.names())}")
        _require(self.beta == 0, "beta", self.beta, "0 for SFT (it has no KL-to-reference term)")
        self.save_hyperparameters()

    @property
    def needs_reference(self) -> bool:
        return False

    def check_datamodule(self, datamodule: Any) -> None:
        if not isinstance(datamodule, SFTDataModule):
            raise ValueError(f"SFT trains on reference solutions: use rftlab.SFTDataModule(task=...), "
                             f"not {type(datamodule).__name__} (which samples completions)")
        super().check_datamodule(datamodule)  # prompt and answer budgets within the model's context

    def compute_loss(self, batch: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.policy_logits(batch)  # temperature 1: the model's own distribution
        # the entropy metric comes from the same normalisation of the logits as the log-probs
        logp, entropy = selective_log_softmax_and_entropy(logits, batch.completion_ids)
        mask = batch.completion_mask.float()
        loss = aggregate(-logp, mask, self.hparams.loss_agg)
        with torch.no_grad():
            token_nll = masked_mean(-logp.detach(), mask)
            accuracy = masked_mean((logits.detach().argmax(-1) == batch.completion_ids).float(), mask)
        metrics = {"loss/nll": loss.detach(), "sft/perplexity": token_nll.exp(), "sft/token_accuracy": accuracy,
                   "entropy": masked_mean(entropy, batch.completion_mask)}
        return loss, metrics
