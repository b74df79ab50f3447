"""A learned reward model: a Hugging Face sequence-classification model from a local folder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class RewardModel:
    """Scores ``prompt + completion`` with a sequence-classification model's logit, in batches.

    Formula: ``r_i = logits(prompt_i + completion_i)[label]`` (the model's score head on the last
    non-padding token, as trained by TRL's RewardTrainer), optionally ``* scale + shift``.

    Args:
        path: a local model folder (``AutoModelForSequenceClassification``); never fetched from a hub.
        batch_size: sequences per forward pass.
        max_length: longest input in tokens (longer inputs keep their end).
        label: which logit is the reward (0 for single-output reward models).
        include_prompt: score ``prompt + completion`` (True) or the completion alone.
        scale, shift: an affine map of the raw logit.
        device: where the model runs.
    """

    name = "reward_model"

    def __init__(self, path: str, batch_size: int = 8, max_length: int = 1024, label: int = 0,
                 include_prompt: bool = True, scale: float = 1.0, shift: float = 0.0, device: str = "cpu") -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        self.path, self.batch_size, self.max_length, self.label = path, batch_size, max_length, label
        self.include_prompt, self.scale, self.shift, self.device = include_prompt, scale, shift, device
        self._model = self._tokenizer = None
        self._load()  # a wrong path is a construction error
        num_labels = self._model.config.num_labels
        if not 0 <= label < num_labels:
            raise ValueError(f"label={label} but the model has {num_labels} output(s)")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None, "_tokenizer": None}

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            model = AutoModelForSequenceClassification.from_pretrained(self.path, local_files_only=True,
                                                                       use_kernels=False)  # no hub kernels: no network
        except OSError as err:
            raise ValueError(f"reward model path={self.path!r} is not a local model folder: {err}") from err
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
        # The score is read at the last non-padding token, which the model locates by pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
        self._model, self._tokenizer = model.to(self.device).eval(), tokenizer

    def __call__(self, completions: Sequence[str], prompts: Sequence[str] | None = None, **_: Any) -> list[float]:
        import torch

        if self._model is None:
            self._load()
        texts = [(p if self.include_prompt and prompts is not None else "") + c
                 for p, c in zip(prompts or [""] * len(completions), completions)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                    truncation=True, max_length=self.max_length, add_special_tokens=False)
            with torch.no_grad():
                logits = self._model(**batch.to(self.device)).logits.float()
            scores.extend((logits[:, self.label] * self.scale + self.shift).tolist())
        return scores
