"""benchmarks/memory.py: the configuration matrix and the target checks (the measurements run apart)."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def memory():
    return load_benchmark("memory")


def test_every_issue_configuration_is_measured(memory):
    configs = memory.configurations()
    assert len(configs) == 4 * 2 * 2 + 2
    assert configs["qlora_nf4_gc_beta0.04"] == {"precision": "32-true", "lora": True, "quantization": "nf4",
                                                 "gradient_checkpointing": True, "beta": 0.04}
    assert configs["lora_bf16_beta0"]["precision"] == "bf16-mixed"
    assert configs["full_fp32_adamw8bit_beta0"]["optimizer"] == "adamw8bit"
    assert configs["lora_bf16_weights_beta0"]["dtype"] == "bfloat16"


def _result(name, peak, ckpt=1.0, weights=0.5, model=100.0):
    return {"name": name, "peak_rss_mb": peak, "train_peak_rss_mb": peak, "ckpt_mb": ckpt, "ckpt_weights_mb": weights,
            "model_fp32_mb": model, "median_step_s": 2.0, "median_generate_s": 1.5, "median_train_s": 0.5}


def test_targets_are_checked_against_the_issue(memory):
    checks = memory.targets([
        _result("lora_fp32_beta0", 1000), _result("lora_fp32_beta0.04", 1120),  # +12%: fails
        _result("qlora_nf4_beta0", 900), _result("qlora_nf4_beta0.04", 950),    # +5.6%: passes
        _result("full_fp32_beta0", 2000, ckpt=40.0),
    ])
    assert "FAIL lora_fp32: beta>0 / beta=0 peak_rss_mb = 1.120 (target <= 1.10)" in checks
    assert "PASS qlora_nf4: beta>0 / beta=0 peak_rss_mb = 1.056 (target <= 1.10)" in checks
    assert "PASS qlora_nf4 peak_rss_mb 900 < lora_fp32 1000" in checks
    assert any(c.startswith("PASS LoRA weights checkpoint = 0.5% of the fp32 model") for c in checks)
    assert any(c.startswith("PASS LoRA checkpoint = 2.5% of the full fine-tuning checkpoint") for c in checks)


def test_a_failed_configuration_is_reported_not_checked(memory):
    results = [{"name": "lora_fp32_beta0", "error": "RuntimeError: boom"}, _result("lora_fp32_beta0.04", 1000)]
    assert memory.targets(results) == []
    assert "error: RuntimeError: boom" in memory.markdown(results)
