"""Golden values of every algorithm: loss, metrics, rollout annotations and gradients, unchanged.

Each case of ``golden_cases.CASES`` (a module on the tiny policy, a fixed rollout, one scored
minibatch; see ``golden_cases`` for the flow) is recomputed and compared with the values recorded
by ``python tests/algorithms/record_golden.py`` in ``golden_values.pt``:

- the loss and every metric ``compute_loss`` returns (the set of metric names must be equal);
- the rollout after ``shape_rewards`` + ``score_rollout``: rewards (shaped), advantages,
  seq_advantages, old_logp, ref_logp, values, returns (None must stay None) and every tensor in
  ``rollout.seq_extras`` (SegmentRFT's segment starts, mask, rewards, targets, old values);
- the gradient of every trainable parameter after ``loss.backward()`` (the set of names must be
  equal): in full up to ``FULL_GRADIENT_LIMIT`` elements, above as (sum, L2 norm, dot with a fixed
  random vector).

Tolerances: rtol 1e-5 and atol 1e-6, the atol of gradients (and fingerprints) scaled by the
recorded tensor's largest magnitude (its norm for fingerprints).

After a redesign of the algorithm layer:

- constructor arguments moved or renamed (typed option groups, registries chosen by name,
  ``num_generations`` moving to the RolloutDataModule): edit the kwargs dicts in
  ``golden_cases.CASES`` (the only place that names them) and, if construction itself changes,
  ``golden_cases.make_module``; do not re-record.
- parameters renamed (e.g. a new ``policy.``/``actor.`` prefix, the value head moved): map the new
  names to the recorded ones in ``golden_cases.canonical_name``. It keys both the comparison and
  the seeded noise ``golden_cases.perturb``/``reinit_lora`` add, so the numbers line up again.
  ``test_parameter_names`` lists the unmatched names on both sides.
- metrics renamed: add ``new name: recorded name`` to ``RENAMED_METRICS`` below.

Only an intended change of the numbers justifies re-recording (say so in the commit message).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import golden_cases
from golden_cases import ANNOTATIONS, CASES, run_case

GOLDEN = Path(__file__).with_name("golden_values.pt")
RTOL, ATOL = 1e-5, 1e-6
#: new metric name -> name in golden_values.pt (empty while the names are the recorded ones).
RENAMED_METRICS: dict[str, str] = {}


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, weights_only=False)["cases"]


@pytest.fixture(scope="module")
def computed() -> dict:
    """Each case computed once per module run (several tests read it)."""
    return {}


def result(computed: dict, name: str) -> dict:
    if name not in computed:
        computed[name] = run_case(name)
    return computed[name]


def test_every_case_is_recorded(golden):
    assert set(golden) == set(CASES), "record new cases with python tests/algorithms/record_golden.py <name>"


def scaled_close(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | float, msg: str) -> None:
    atol = ATOL * max(float(scale), 1.0)
    assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{msg}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_metrics(name, golden, computed):
    want, got = golden[name], result(computed, name)
    metrics = {RENAMED_METRICS.get(k, k): v for k, v in got["metrics"].items()}
    assert sorted(metrics) == sorted(want["metrics"]), (
        f"metric names differ: new {sorted(set(metrics) - set(want['metrics']))}, "
        f"missing {sorted(set(want['metrics']) - set(metrics))}")
    assert_close(got["loss"], want["loss"], rtol=RTOL, atol=ATOL, msg=lambda m: f"loss: {m}")
    for key, value in want["metrics"].items():
        assert_close(metrics[key], value, rtol=RTOL, atol=ATOL, msg=lambda m, key=key: f"metric {key}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_rollout_annotations(name, golden, computed):
    want, got = golden[name], result(computed, name)
    for field in ANNOTATIONS:
        expected, actual = want["annotations"][field], got["annotations"][field]
        assert (actual is None) == (expected is None), f"rollout.{field}: recorded {expected}, now {actual}"
        if expected is not None:
            assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m, f=field: f"rollout.{f}: {m}")
    assert sorted(got["seq_extras"]) == sorted(want["seq_extras"]), "rollout.seq_extras keys differ"
    for key, expected in want["seq_extras"].items():
        assert_close(got["seq_extras"][key], expected, rtol=RTOL, atol=ATOL,
                     msg=lambda m, key=key: f"rollout.seq_extras[{key!r}]: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_parameter_names(name, golden, computed):
    want, got = golden[name], result(computed, name)
    assert got["grad_numel"] == want["grad_numel"], (
        f"trainable parameters differ (map renames in golden_cases.canonical_name): "
        f"new {sorted(set(got['grad_numel']) - set(want['grad_numel']))[:8]}, "
        f"missing {sorted(set(want['grad_numel']) - set(got['grad_numel']))[:8]}")
    assert sorted(got["grads"]) == sorted(want["grads"]) and sorted(got["fingerprints"]) == sorted(want["fingerprints"])


@pytest.mark.parametrize("name", list(CASES))
def test_gradients(name, golden, computed):
    want, got = golden[name], result(computed, name)
    assert set(got["grads"]) | set(got["fingerprints"]) == set(want["grads"]) | set(want["fingerprints"])
    for key, expected in want["grads"].items():
        actual = got["grads"][key]
        assert (actual is None) == (expected is None), f"{key}: gradient recorded {expected is not None}, now {actual is not None}"
        if expected is not None:
            if key.endswith("value_head.bias") and expected.dim() == 0:
                expected = expected.reshape(1)  # recorded when the bias was a scalar; FSDP2 needs shape (1,)
            scaled_close(actual, expected, expected.abs().max(), f"grad {key}")
    for key, expected in want["fingerprints"].items():
        scaled_close(got["fingerprints"][key], expected, expected[1], f"grad fingerprint (sum, norm, dot) {key}")


def test_flow_is_deterministic_in_process():
    # A second computation in the same process gives the same numbers bit for bit (no state leaks
    # from one run into the next: caches, the KL controller, RNG).
    name = "ppo_model_adaptive_kl"
    a, b = run_case(name), run_case(name)
    assert a["loss"] == b["loss"] and a["metrics"] == b["metrics"]
    for key, grad in a["grads"].items():
        assert torch.equal(grad, b["grads"][key]), key
    assert golden_cases.CASES[name].num_updates == 2


@pytest.mark.parametrize("name", list(CASES))
def test_golden_values_hold_with_explicit_attention(name, golden):
    # The recorded values came from SDPA; the CPU default for short packed rows is explicit attention
    # (forward.packed_attention="auto"), the same math summed in another order. Every case agrees
    # within float32 rounding of that order: loss, rollout annotations and gradients.
    want, got = golden[name], run_case(name, packed_attention="eager")
    assert_close(got["loss"], want["loss"], rtol=1e-4, atol=1e-5)
    for field in ANNOTATIONS:
        expected, actual = want["annotations"][field], got["annotations"][field]
        assert (actual is None) == (expected is None), field
        if expected is not None:
            assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=lambda m, f=field: f"rollout.{f}: {m}")
    for key, expected in want["grads"].items():
        if expected is not None:
            actual = got["grads"][key].reshape(expected.shape)
            assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(float(expected.abs().max()), 1.0),
                         msg=lambda m, key=key: f"grad {key}: {m}")
    for key, expected in want["fingerprints"].items():
        assert_close(got["fingerprints"][key], expected, rtol=1e-4, atol=1e-5 * max(float(expected[1]), 1.0),
                     msg=lambda m, key=key: f"grad fingerprint {key}: {m}")
