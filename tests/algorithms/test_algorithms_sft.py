"""SFT on reference solutions: the loss is the completion NLL, it learns, and any algorithm starts from it."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import assert_params_changed, fit_tiny, trainable_snapshot
from lightning.pytorch.loggers import CSVLogger

from rftlab import DAPO, GRPO, PPO, SFT, RolloutDataModule, SFTDataModule
from rftlab.rollout.references import reference_text
from rftlab.cli import make_cli
from rftlab.models.export import export_checkpoint
from rftlab.models.policy import adapter_disabled
from rftlab.tasks import Arithmetic, WordProblems

CONFIGS = Path(__file__).parents[2] / "configs"
TEMPLATE = "{a} {op} {b} = {answer}"
# A merged adapter computes (W + s B A) x instead of W x + s B (A x): equal up to float rounding.
MERGED = dict(rtol=1e-4, atol=2e-4)


def _sft(**kwargs) -> SFT:
    module = SFT(**{"policy": "tiny", "lr": 1e-2, "log": {"validate_at_start": False}, **kwargs})
    module.configure_model()
    return module


def _data(**kwargs) -> SFTDataModule:
    return SFTDataModule(**{"task": Arithmetic(num_test=4), "batch_size": 4, "target_template": TEMPLATE,
                            "val_max_new_tokens": 4, **kwargs})


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_reference_batch_holds_prompt_then_reference_and_eos(tokenizer):
    dm = _data(max_target_length=14).attach(_sft())
    rows = [dict(r) for r in dm.task.test_rows()[:2]]
    rows[1] = {**rows[1], "a": 123456789, "b": 987654321}  # a reference longer than 14 tokens
    batch = dm.reference_batch(rows, tokenizer)
    first = tokenizer(reference_text(rows[0], TEMPLATE), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(first)
    assert n <= 14 and batch.completion_ids[0, :n].tolist() == first, "reference then EOS, right-padded"
    assert batch.completion_mask[0].tolist() == [1] * n + [0] * (batch.completion_mask.shape[1] - n)
    assert batch.completion_mask[1].sum() == 14 and batch.truncated.tolist() == [False, True]
    assert tokenizer.eos_token_id not in batch.completion_ids[1].tolist(), "a cut reference must not teach stopping"
    assert batch.prompt_mask[:, -1].tolist() == [1, 1], "prompts are left-padded"


def test_loss_is_the_nll_of_completion_tokens_only(tokenizer):
    module = _sft()
    batch = _data().attach(module).next_minibatch()
    loss, metrics = module.compute_loss(batch)
    # Reference: one full forward over prompt + completion, picking the completion targets by hand.
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = module.policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    P, total, count = batch.prompt_ids.shape[1], 0.0, 0
    for i in range(len(batch)):
        for t in range(int(batch.completion_mask[i].sum())):
            total -= torch.log_softmax(logits[i, P + t - 1], -1)[batch.completion_ids[i, t]]
            count += 1
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-5)
    assert torch.isclose(metrics["sft/perplexity"], (total / count).exp(), rtol=1e-4)


def test_sft_learns_the_references_of_a_fixed_batch():
    module = _sft(lr=3e-2)
    batch = _data().attach(module).next_minibatch()
    optimizer = module.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss, _ = module.compute_loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_sft_fit_with_lora_changes_the_adapter_and_logs(tmp_path):
    module = _sft(lora=True, lr=2e-2, log={"validate_at_start": True})
    before = trainable_snapshot(module)
    fit_tiny(module, _data(), 3, tmp_path, logger=CSVLogger(tmp_path), val_check_interval=3, limit_val_batches=1,
             num_sanity_val_steps=2)
    assert_params_changed(before, module, require="any")
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss/nll", "sft/token_accuracy", "sft/perplexity", "val/accuracy", "grad_norm"} <= set(header)


def test_target_column_and_pairing_errors():
    assert reference_text({"prompt": "p", "solution": "s", "answer": "a"}) == "s"
    assert reference_text({"prompt": "p", "answer": 7}) == "7"
    with pytest.raises(ValueError, match=r"target_template='\{result\}' names 'result'.*columns: \['a', 'answer'"):
        _data(target_template="{result}")
    with pytest.raises(ValueError, match="beta=0.1 is invalid: must be 0 for SFT"):
        SFT(policy="tiny", beta=0.1)
    with pytest.raises(ValueError, match="SFT trains on reference solutions: use rftlab.SFTDataModule"):
        RolloutDataModule(task=Arithmetic(num_test=2)).attach(_sft()).next_minibatch()
    with pytest.raises(ValueError, match="SFTDataModule feeds reference solutions.*GRPO samples its own"):
        _data().attach(GRPO(policy="tiny")).next_minibatch()


def test_word_problems_train_on_their_worked_solutions(tokenizer):
    dm = SFTDataModule(task=WordProblems(num_test=2), batch_size=2).attach(_sft())
    batch = dm.next_minibatch()
    assert all("Answer:" in text for text in batch.completions)


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    module = _sft(lora=True, lr=5e-2)
    trainer = fit_tiny(module, _data(), 2, folder)
    trainer.save_checkpoint(folder / "sft.ckpt")
    return module, folder / "sft.ckpt"


@pytest.mark.parametrize("algorithm, kwargs", [(GRPO, dict(lora=True, beta=0.1)), (DAPO, dict(lora=True)),
                                               (PPO, dict(beta=0.1))])
def test_any_algorithm_starts_from_the_sft_checkpoint(sft_checkpoint, tokenizer, algorithm, kwargs):
    sft, path = sft_checkpoint
    ids = torch.randint(3, len(tokenizer), (2, 7))
    module = algorithm(policy={"model": "tiny", "init_checkpoint": str(path)}, **kwargs)
    module.configure_model()
    expected = _logits(sft.policy, ids)
    torch.testing.assert_close(_logits(module.policy, ids), expected, **MERGED)
    with adapter_disabled(module.policy):  # the reference is the SFT policy too
        reference = module.ref_policy if module.ref_policy is not None else module.policy
        torch.testing.assert_close(_logits(reference, ids), expected, **MERGED)


def test_an_exported_sft_folder_is_a_policy(sft_checkpoint, tmp_path, tokenizer):
    sft, path = sft_checkpoint
    out = export_checkpoint(path, tmp_path / "sft")
    module = GRPO(policy=str(out), lora=True)
    module.configure_model()
    ids = torch.randint(3, len(tokenizer), (2, 7))
    torch.testing.assert_close(_logits(module.policy, ids), _logits(sft.policy, ids), **MERGED)


def test_a_chained_run_rebuilds_through_both_checkpoints(sft_checkpoint, tmp_path, tokenizer):
    """SFT -> GRPO (from the SFT checkpoint) -> export: the export holds both updates."""
    from transformers import AutoModelForCausalLM

    _, path = sft_checkpoint
    grpo = GRPO(policy={"model": "tiny", "init_checkpoint": str(path)}, lora=True)
    grpo.configure_model()
    with torch.no_grad():
        for name, p in grpo.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(grpo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.save_checkpoint(tmp_path / "grpo.ckpt")
    out = export_checkpoint(tmp_path / "grpo.ckpt", tmp_path / "out")
    ids = torch.randint(3, len(tokenizer), (2, 7))
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), ids), _logits(grpo.policy, ids),
                               **MERGED)


def test_rftlab_fit_runs_the_sft_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = make_cli([
        "fit", "--config", str(CONFIGS / "sft_arithmetic.yaml"), "--trainer.logger", "false",
        "--model.init_args.policy.model", "tiny", "--data.init_args.batch_size", "2", "--data.init_args.val_max_new_tokens", "3",
        "--data.init_args.task.init_args.num_test", "2", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]", "--trainer.precision", "32-true",
    ])
    assert isinstance(cli.model, SFT) and cli.trainer.global_step == 2
    assert "loss/nll" in cli.trainer.callback_metrics


def test_sft_does_not_say_why_kl_is_absent(tmp_path, caplog):
    # The message is for RL runs at beta 0; SFT has no sampled policy drifting from a reference.
    module = _sft(lr=1e-2)
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        fit_tiny(module, _data(), 1, tmp_path)
    assert not [r for r in caplog.records if "kl is not logged" in r.getMessage()]
