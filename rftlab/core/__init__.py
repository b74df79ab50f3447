"""Pure tensor math of RL fine-tuning: no Lightning, no transformers, no I/O.

Shapes: N sequences, T completion positions (right-padded), V vocabulary; ``mask`` is 1 on real
completion tokens (EOS included). Variants are chosen by name from the registries
(``AGGREGATIONS``, ``ADVANTAGE_SCALES``, ``KL_ESTIMATORS``), to which users can add their own.
"""

from rftlab.core.advantages import ADVANTAGE_SCALES, gae, group_advantages, whiten
from rftlab.core.logprobs import entropy_from_logits, selective_log_softmax
from rftlab.core.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    aggregate,
    explained_variance,
    kl_penalty,
    policy_loss,
    value_loss,
)
from rftlab.core.masked import masked_mean, masked_sum, masked_var
from rftlab.core.registry import Registry
from rftlab.core.shaping import overlong_penalty
from rftlab.core.segments import (
    SEGMENT_RATIO_MODES,
    SEGMENT_WHITENING,
    SegmentRewardParams,
    batch_segment_rewards,
    exact_kl,
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
    "SEGMENT_RATIO_MODES",
    "SEGMENT_WHITENING",
    "SegmentRewardParams",
    "batch_segment_rewards",
    "exact_kl",
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
    "ADVANTAGE_SCALES",
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
    "value_loss",
    "whiten",
]
