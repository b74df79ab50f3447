"""Pure tensor math of RL fine-tuning: no Lightning, no transformers, no I/O.

Shapes: N sequences, T completion positions (right-padded), V vocabulary; ``mask`` is 1 on real
completion tokens (EOS included). Variants are chosen by name from the registries: whole
advantage estimators (``ADVANTAGE_ESTIMATORS``, ``register_advantage``; RLOO, REINFORCE++ and ReMax
in ``baselines``), whole policy losses (``POLICY_LOSSES``, ``register_policy_loss``; GSPO, CISPO,
SAPO and GMPO in ``policy_losses``), rollout-correction modes (``ROLLOUT_CORRECTIONS``), and the
smaller pieces (``AGGREGATIONS``, ``ADVANTAGE_SCALES``, ``KL_ESTIMATORS``), to which users can add
their own.
"""

from rftlab.core.advantages import (
    ADVANTAGE_CONTRACT,
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_SCALES,
    gae,
    group_advantages,
    register_advantage,
    token_level_rewards,
    whiten,
)
from rftlab.core.baselines import (
    discounted_returns,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
)
from rftlab.core.correction import (
    ROLLOUT_CORRECTIONS,
    check_correction_options,
    correction_gap_metrics,
    correction_weights,
)
from rftlab.core.entropy import adaptive_entropy_coef, entropy_bonus_active, top_entropy_mask
from rftlab.core.logprobs import entropy_from_logits, selective_log_softmax, selective_log_softmax_and_entropy
from rftlab.core.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSS_CONTRACT,
    POLICY_LOSSES,
    aggregate,
    explained_variance,
    kl_penalty,
    policy_loss,
    register_policy_loss,
    value_loss,
)
from rftlab.core.masked import masked_mean, masked_sum, masked_var
from rftlab.core.policy_losses import cispo_loss, gmpo_loss, gspo_loss, gspo_token_loss, sapo_loss
from rftlab.core.registry import Registry, call_plugin, check_plugin_options, takes_input
from rftlab.core.shaping import overlong_penalty
from rftlab.core.segments import (
    SEGMENT_RATIO_MODES,
    SEGMENT_WHITENING,
    SegmentRewardParams,
    batch_segment_rewards,
    exact_kl,
    merge_environment_segments,
    segment_ids,
    segment_index_from_starts,
    segment_kl_loss,
    segment_policy_loss,
    segment_rewards,
    segment_spans,
    segment_sum,
    segment_value_loss,
    segment_value_targets,
    split_segments,
)

__all__ = [
    "ROLLOUT_CORRECTIONS",
    "adaptive_entropy_coef",
    "check_correction_options",
    "cispo_loss",
    "correction_gap_metrics",
    "correction_weights",
    "discounted_returns",
    "entropy_bonus_active",
    "gmpo_loss",
    "gspo_loss",
    "gspo_token_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "remax_advantages",
    "rloo_advantages",
    "sapo_loss",
    "takes_input",
    "top_entropy_mask",
    "SEGMENT_RATIO_MODES",
    "SEGMENT_WHITENING",
    "SegmentRewardParams",
    "batch_segment_rewards",
    "exact_kl",
    "merge_environment_segments",
    "segment_ids",
    "segment_index_from_starts",
    "segment_kl_loss",
    "segment_policy_loss",
    "segment_rewards",
    "segment_spans",
    "segment_sum",
    "segment_value_loss",
    "segment_value_targets",
    "split_segments",
    "ADVANTAGE_CONTRACT",
    "ADVANTAGE_ESTIMATORS",
    "ADVANTAGE_SCALES",
    "POLICY_LOSS_CONTRACT",
    "POLICY_LOSSES",
    "call_plugin",
    "check_plugin_options",
    "register_advantage",
    "register_policy_loss",
    "token_level_rewards",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "Registry",
    "aggregate",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "overlong_penalty",
    "policy_loss",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "value_loss",
    "whiten",
]
