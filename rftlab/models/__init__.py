"""Policy loading (bundled default, local path, hub id, tiny test model), LoRA, quantization, optimizers, export."""

from rftlab.models.build import REFERENCE_PLACEMENTS, PolicySpec, build_policy
from rftlab.models.export import export_checkpoint, load_checkpoint_policy
from rftlab.models.loading import ModelNotFoundError, cache_dir, default_model_dir, load_causal_lm, load_tokenizer
from rftlab.models.optim import OPTIMIZERS, build_optimizer
from rftlab.models.policy import adapter_disabled, apply_lora, completion_logits
from rftlab.models.quantization import QUANTIZATIONS, keep_cpu_4bit_trainable
from rftlab.models.runtime import ForwardOptions, PolicyRuntime
from rftlab.models.sharding import FSDP2Strategy

__all__ = [
    "OPTIMIZERS", "QUANTIZATIONS", "REFERENCE_PLACEMENTS", "FSDP2Strategy", "ForwardOptions", "ModelNotFoundError", "PolicyRuntime", "PolicySpec", "adapter_disabled",
    "apply_lora", "build_optimizer", "build_policy", "cache_dir", "completion_logits", "default_model_dir",
    "export_checkpoint", "keep_cpu_4bit_trainable", "load_causal_lm", "load_checkpoint_policy", "load_tokenizer",
]
