"""RewardModel: a local sequence-classification model, batched scores equal one-by-one scores."""

from __future__ import annotations

import pickle

import pytest
import torch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("reward-model")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_batched_scores_equal_single_scores(model_dir):
    from rftlab.rewards import RewardModel

    texts = ["short", "a much longer completion with many more tokens in it", "mid length one"]
    prompts = ["Q: ", "Question two: ", "Q3 "]
    batched = RewardModel(model_dir, batch_size=3)(texts, prompts=prompts)
    single = RewardModel(model_dir, batch_size=1)(texts, prompts=prompts)
    # Padding must not move the score: it is read at each sequence's last real token.
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), rtol=1e-4, atol=1e-5)
    assert len(set(round(s, 6) for s in batched)) == 3


def test_prompt_inclusion_scale_and_shift(model_dir):
    from rftlab.rewards import RewardModel

    base = RewardModel(model_dir)(["answer"], prompts=["Q: "])[0]
    alone = RewardModel(model_dir, include_prompt=False)(["answer"], prompts=["Q: "])[0]
    mapped = RewardModel(model_dir, scale=2.0, shift=1.0)(["answer"], prompts=["Q: "])[0]
    assert alone != pytest.approx(base)
    assert mapped == pytest.approx(2 * base + 1, rel=1e-5)


def test_picklable_and_bad_input(model_dir, tmp_path):
    from rftlab.rewards import RewardModel

    reward = RewardModel(model_dir)
    clone = pickle.loads(pickle.dumps(reward))
    assert clone._model is None and clone(["x"]) == pytest.approx(reward(["x"]), rel=1e-5)
    with pytest.raises(ValueError, match="label=1"):
        RewardModel(model_dir, label=1)
    with pytest.raises(ValueError, match="not a local model folder"):
        RewardModel(str(tmp_path / "missing"))
