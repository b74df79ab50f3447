"""Checkpoints, export and generate: small LoRA checkpoints, identical logits after every round trip."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from helpers import fit_tiny

from rftlab import GRPO, RolloutDataModule
from rftlab.cli import main
from rftlab.models.export import export_checkpoint, load_checkpoint_policy, read_checkpoint
from rftlab.models.loading import ModelNotFoundError
from rftlab.tasks import Arithmetic


# A merged adapter computes (W + s B A) x instead of W x + s B (A x): equal up to float rounding.
MERGED = dict(rtol=1e-4, atol=2e-4)


def _parity(completions, **_):
    return [float(len(c) % 2 == 0) for c in completions]


def _fit(module, tmp_path, steps: int = 2, num_generations: int = 4):
    """Train ``module`` a few steps and save a Lightning checkpoint; returns its path."""
    dm = RolloutDataModule(task=Arithmetic(num_test=2), rewards={"parity": _parity}, prompts_per_step=2,
                           num_generations=num_generations, max_new_tokens=4)
    trainer = fit_tiny(module, dm, steps, tmp_path)
    path = tmp_path / f"{'lora' if module.policy_spec.lora else 'full'}.ckpt"
    trainer.save_checkpoint(path)
    return path


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture(scope="module")
def ids(tokenizer):
    return torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))


def _grpo(**kwargs):
    module = GRPO(**{"policy": "tiny", **kwargs})
    module.configure_model()
    return module


# One training run per kind, shared by the tests of this file (each fit takes seconds).
@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    module = _grpo(lora=True, lr=5e-2)
    return module, _fit(module, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def trained_full(tmp_path_factory):
    module = _grpo(lr=1e-2)
    return module, _fit(module, tmp_path_factory.mktemp("full"), steps=1)


def test_lora_checkpoint_is_small_and_round_trips_to_identical_logits(trained_lora, trained_full, ids):
    module, path = trained_lora
    state = read_checkpoint(path)["state_dict"]
    assert state and all("lora_" in k for k in state), "an adapter checkpoint holds only the adapter"
    # Both files hold weights + AdamW moments: the ratio is that of the trained parameters.
    ratio = path.stat().st_size / trained_full[1].stat().st_size
    assert ratio < 0.05, f"LoRA checkpoint is {100 * ratio:.1f}% of the full one"

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
        restored = GRPO.load_from_checkpoint(path)  # the frozen base comes from `policy`, as intended
    torch.testing.assert_close(_logits(restored.policy, ids), _logits(module.policy, ids), rtol=0, atol=0)


def test_export_merged_loads_in_transformers_with_the_trained_logits(tmp_path, trained_lora, ids):
    from transformers import AutoModelForCausalLM

    module, path = trained_lora
    out = export_checkpoint(path, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model, ids), _logits(module.policy, ids), **MERGED)
    info = json.loads((out / "rftlab_export.json").read_text())
    assert info["global_step"] == 2 and info["policy"]["lora"] is True


def test_export_of_a_full_fine_tune(tmp_path, trained_full, ids):
    from transformers import AutoModelForCausalLM

    module, path = trained_full
    out = export_checkpoint(path, tmp_path / "full")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), ids), _logits(module.policy, ids),
                               rtol=0, atol=0)


def test_export_adapter_only_cli(tmp_path, trained_lora, ids, capsys):
    from peft import PeftModel

    from rftlab.models.loading import tiny_llama

    module, path = trained_lora
    out = tmp_path / "adapter"
    main(["export", "--ckpt", str(path), "--out", str(out), "--adapter_only"])
    # "tiny" is a random model with no folder: a hint naming AutoPeftModel would send the user to
    # the hub for a repository called "tiny".
    hint = capsys.readouterr().out
    vocab, seed = module.policy.config.vocab_size, module.policy_spec.seed
    assert f"tiny_llama({vocab}, seed={seed})" in hint and "AutoPeftModel" not in hint, hint
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    base = tiny_llama(module.policy.config.vocab_size, seed=module.policy_spec.seed)  # "tiny" has no folder
    model = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(_logits(model, ids), _logits(module.policy, ids), rtol=1e-6, atol=1e-6)


def test_qlora_export_merges_into_the_dequantized_base(tmp_path, ids):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    module = _grpo(policy={"model": "tiny", "lora": True, "quantization": "nf4"}, lr=5e-2)
    out = export_checkpoint(_fit(module, tmp_path, steps=1), tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    torch.testing.assert_close(_logits(model, ids), _logits(module.policy, ids), rtol=1e-4, atol=1e-4)


def test_export_whose_base_model_cannot_be_found(tmp_path, tokenizer, ids):
    from rftlab.models.loading import tiny_llama

    base = tmp_path / "base"
    tiny_llama(len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    module = GRPO(policy=str(base), lora=True, lr=5e-2)
    path = _fit(module, tmp_path, steps=1, num_generations=2)
    moved = tmp_path / "moved"
    shutil.move(base, moved)
    with pytest.raises(ModelNotFoundError, match=r"trained from policy\.model='.*base', which cannot be found.*--base"):
        export_checkpoint(path, tmp_path / "out")
    out = export_checkpoint(path, tmp_path / "out", base=str(moved))
    from transformers import AutoModelForCausalLM

    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), ids), _logits(module.policy, ids),
                               **MERGED)


def test_bad_export_requests(tmp_path, trained_full):
    path = trained_full[1]
    with pytest.raises(ValueError, match="adapter_only=True but checkpoint .* trained all weights"):
        export_checkpoint(path, tmp_path / "a", adapter_only=True)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not written by an rftlab algorithm"):
        export_checkpoint(tmp_path / "other.ckpt", tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="is neither a file nor a sharded checkpoint folder"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "c")


def test_generate_cli_answers_held_out_rows_as_the_trained_policy_does(tmp_path, trained_lora, capsys):
    module, path = trained_lora
    output = tmp_path / "answers.jsonl"
    records = main_generate(["--ckpt", str(path), "--task.class_path", "rftlab.tasks.Arithmetic",
                             "--task.init_args.num_test", "3", "--num_prompts", "3", "--max_new_tokens", "5",
                             "--output", str(output)])
    assert len(records) == 3 and all(len(r["answers"]) == 1 and len(r["correct"]) == 1 for r in records)
    assert len(output.read_text().splitlines()) == 3
    assert "answers correct" in capsys.readouterr().out
    # Greedy answers equal the training module's own greedy answers to the same prompts.
    from rftlab.rollout.evaluation import score_answers
    from rftlab.rollout.sampler import SamplingParams

    dm = RolloutDataModule(task=Arithmetic(num_test=3), max_new_tokens=5).attach(module)
    expected = score_answers(dm, module, list(dm.task.test_rows()), SamplingParams(max_new_tokens=5, greedy=True))
    assert [r["answers"][0] for r in records] == expected.completions


def main_generate(args):
    from rftlab.experiments.generation import generate_main

    return generate_main(args)


def test_generate_cli_on_free_prompts_samples_several_answers(tmp_path, trained_lora):
    _, path = trained_lora
    main(["generate", "--ckpt", str(path), "--prompts", "[Hello, Calculate 1 + 2.]", "--greedy", "false",
          "--num_samples", "2", "--max_new_tokens", "3", "--output", str(tmp_path / "a.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [len(r["answers"]) for r in rows] == [2, 2] and "correct" not in rows[0]


def test_checkpoint_policy_can_be_rebuilt_unmerged(trained_lora, ids):
    module, path = trained_lora
    loaded = load_checkpoint_policy(path)
    assert any("lora_B" in n for n, _ in loaded.model.named_parameters())
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(module.policy, ids), rtol=0, atol=0)
