"""Policy loading (bundled default, local path, hub id, tiny test model) and LoRA helpers."""

from rftlab.models.loading import ModelNotFoundError, cache_dir, default_model_dir, load_causal_lm, load_tokenizer
from rftlab.models.policy import adapter_disabled, apply_lora, completion_logits

__all__ = ["ModelNotFoundError", "adapter_disabled", "apply_lora", "cache_dir", "completion_logits", "default_model_dir", "load_causal_lm", "load_tokenizer"]
