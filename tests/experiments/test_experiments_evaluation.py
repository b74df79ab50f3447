"""Held-out evaluation: the pass@k estimator, greedy/sampled evaluation, checkpoints, `rftlab evaluate`."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from helpers import assert_params_changed, assert_params_unchanged, fit_tiny, trainable_snapshot
from lightning.pytorch.callbacks import ModelCheckpoint

from rftlab import GRPO, RolloutDataModule
from rftlab.cli import main
from rftlab.experiments import evaluate, load_policy, pass_at_k
from rftlab.experiments.evaluation import question_of
from rftlab.tasks import Arithmetic, RowsTask


@pytest.mark.parametrize("n, c, k, expected", [(4, 1, 1, 0.25), (4, 1, 2, 0.5), (5, 0, 3, 0.0), (3, 2, 2, 1.0), (10, 10, 1, 1.0)])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_correct_sample():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                samples = [1] * c + [0] * (n - c)
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute), (n, c, k)


@pytest.mark.parametrize("args, message", [((4, 1, 5), "k=5 is invalid"), ((4, 5, 1), "c=5 is invalid"), ((4, 1, 0), "k=0")])
def test_pass_at_k_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(*args)


def always(completions, **_):
    return [1.0] * len(completions)


def never(completions, **_):
    return [0.0] * len(completions)


def even_length(completions, **_):
    return [float(len(c) % 2 == 0) for c in completions]


def rows_task(reward):
    rows = [{"prompt": f"Say something about {w}.", "answer": "x"} for w in ("cats", "dogs", "rain", "tea")]
    return RowsTask(train=rows, test=rows, rewards={"r": reward})


@pytest.fixture(scope="module")
def tiny_policy():
    module = GRPO(policy="tiny")
    module.configure_model()
    return module


def test_greedy_and_sampled_scores_follow_the_verifier(tiny_policy):
    assert evaluate(tiny_policy, rows_task(always), max_new_tokens=3, num_samples=2, k=[1, 2]).metrics() == {
        "eval/greedy/accuracy": 1.0, "eval/sampled/pass@1": 1.0, "eval/sampled/pass@2": 1.0}
    assert evaluate(tiny_policy, rows_task(never), max_new_tokens=3).greedy_accuracy == 0.0


def test_each_greedy_answer_is_kept_with_its_question_and_verdict(tiny_policy):
    result = evaluate(tiny_policy, rows_task(even_length), max_new_tokens=5, batch_size=3)  # two batches
    kept = result.greedy_answers
    assert [a["question"] for a in kept] == [f"Say something about {w}." for w in ("cats", "dogs", "rain", "tea")]
    assert all(a["reference"] == "x" and a["correct"] == (len(a["answer"]) % 2 == 0) for a in kept)
    assert result.greedy_accuracy == sum(a["correct"] for a in kept) / 4
    chat = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]}
    assert question_of(chat) == "2 + 2?" and question_of({"prompt": "plain"}) == "plain"


def test_sampled_pass_at_k_is_consistent_and_reproducible(tiny_policy):
    task = rows_task(even_length)
    result = evaluate(tiny_policy, task, greedy=False, num_samples=4, k=[1, 2, 4], max_new_tokens=6, seed=3)
    counts = result.correct_counts
    assert len(counts) == 4 and all(0 <= c <= 4 for c in counts)
    assert result.pass_at_k[1] == pytest.approx(sum(counts) / 16)
    assert result.pass_at_k[1] <= result.pass_at_k[2] <= result.pass_at_k[4]
    assert result.pass_at_k[4] == pytest.approx(sum(c > 0 for c in counts) / 4)
    again = evaluate(tiny_policy, task, greedy=False, num_samples=4, k=[1], max_new_tokens=6, seed=3)
    assert again.correct_counts == counts, "the same seed gives the same samples"
    assert 0 < sum(counts) < 16, "the check above needs answers of both kinds"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(greedy=False), "nothing to evaluate"),
        (dict(num_samples=2, k=[3]), "k=\\[3\\] is invalid"),
        (dict(num_samples=-1), "num_samples=-1"),
        (dict(num_prompts=0), "num_prompts=0"),
        (dict(precision="16-mixed"), "precision='16-mixed' is invalid: must be '32-true' or 'bf16-mixed'"),
    ],
)
def test_bad_evaluation_options(tiny_policy, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate(tiny_policy, rows_task(always), **kwargs)


@pytest.mark.parametrize("precision, autocast", [("32-true", False), ("bf16-mixed", True)])
def test_answers_are_generated_at_the_precision_asked(tiny_policy, precision, autocast):
    seen = []

    def record(completions, **_):  # the verifier runs inside the generation's context
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return [1.0] * len(completions)

    result = evaluate(tiny_policy, rows_task(record), max_new_tokens=2, num_samples=2, precision=precision)
    assert result.greedy_accuracy == 1.0 and result.pass_at_k[1] == 1.0
    assert seen and set(seen) == {autocast}
    assert not torch.is_autocast_enabled("cpu"), "the autocast ends with the evaluation"


def test_checkpoint_of_a_lora_run_reloads_the_trained_policy(tmp_path, vary_reward):
    module = GRPO(policy="tiny", lora=True, lr=5e-2)
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards=vary_reward, prompts_per_step=2, num_generations=2,
                           max_new_tokens=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit_tiny(module, dm, 1, callbacks=[checkpoint])
    loaded = load_policy(checkpoint.last_model_path)
    trained = trainable_snapshot(module)
    assert_params_unchanged(trained, loaded)  # the reloaded policy holds every trained parameter, equal
    fresh = GRPO(policy="tiny", lora=True)
    fresh.configure_model()
    assert_params_changed(trained, fresh, require="any",
                          message="training changed the adapter, so the equality above is not trivial")
    with pytest.raises(FileNotFoundError, match="checkpoint="):
        load_policy(tmp_path / "missing.ckpt")


def test_rftlab_evaluate_command(tmp_path, capsys):
    out = tmp_path / "scores.json"
    main(["evaluate", "--policy", "tiny", "--task.class_path", "rftlab.tasks.Arithmetic",
          "--task.init_args.num_test", "3", "--max_new_tokens", "3", "--num_samples", "2", "--k", "[1, 2]",
          "--precision", "bf16-mixed", "--output", str(out)])
    scores = json.loads(out.read_text())
    assert scores["num_prompts"] == 3 and scores["num_samples"] == 2
    assert {"eval/greedy/accuracy", "eval/sampled/pass@1", "eval/sampled/pass@2"} <= set(scores)
    assert all(0.0 <= scores[k] <= 1.0 and math.isfinite(scores[k]) for k in scores if k.startswith("eval/"))
    printed = capsys.readouterr().out
    assert "greedy accuracy" in printed
    answers = scores["greedy_answers"]
    assert len(answers) == 3 and all(a["question"].startswith("Calculate") for a in answers)
    assert scores["eval/greedy/accuracy"] == sum(a["correct"] for a in answers) / 3
    assert "reference:" not in printed  # --show 0: no answers printed
    main(["evaluate", "--policy", "tiny", "--task.class_path", "rftlab.tasks.Arithmetic",
          "--task.init_args.num_test", "3", "--max_new_tokens", "3", "--show", "2"])
    assert capsys.readouterr().out.count("reference:") == 2


def test_evaluate_takes_the_checkpoint_as_export_and_generate_do():
    from rftlab.experiments.cli import evaluate_parser

    parser = evaluate_parser()
    assert parser.parse_args(["--ckpt", "a.ckpt"]).checkpoint == "a.ckpt"
    assert parser.parse_args(["--checkpoint", "b.ckpt"]).checkpoint == "b.ckpt"


def test_evaluate_task_class_does_not_inherit_the_default_tasks_options():
    # A default Arithmetic instance made jsonargparse hand Arithmetic's template to Countdown (ValueError).
    from rftlab.experiments.cli import evaluate_parser
    from rftlab.tasks import Countdown

    parser = evaluate_parser()
    init = parser.instantiate_classes(parser.parse_args(
        ["--task.class_path", "rftlab.tasks.Countdown", "--task.init_args.num_numbers", "3"]))
    assert isinstance(init.task, Countdown) and init.task.num_numbers == 3
    assert parser.instantiate_classes(parser.parse_args([])).task is None  # evaluate_main then uses Arithmetic()
