"""Policy options: bad input at construction, dtype checks per device, reference placement, train mode."""

from __future__ import annotations

import pytest
import torch

from rftlab import GRPO, RolloutDataModule
from rftlab.models import precision
from rftlab.models.build import PolicySpec, build_policy
from rftlab.models.sharding import decoder_layers
from rftlab.tasks import Arithmetic


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(policy={"model": "tiny", "reference_placement": "disk"}), ValueError,
         "policy.reference_placement='disk' is invalid: must be one of 'device', 'cpu', 'offload'"),
        (dict(policy={"model": "tiny", "init_checkpoint": "/no/such/run.ckpt"}), FileNotFoundError,
         "policy.init_checkpoint='/no/such/run.ckpt' is not a file"),
        (dict(policy={"model": "tiny", "compute_dtype": "bf16"}), ValueError,
         "policy.compute_dtype='bf16' is invalid: must be one of 'float32', 'bfloat16', 'float16'"),
        (dict(policy={"model": "tiny", "lora_target_modules": []}, lora=True), ValueError,
         r"policy.lora_target_modules=\[\] is invalid"),
    ],
)
def test_bad_policy_options_raise_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        GRPO(**kwargs)


def test_the_lora_argument_counts_when_the_policy_group_is_checked():
    # Before the groups: GRPO(policy="tiny", lora=True, quantization="nf4"). The top-level lora
    # overrides the group's, so the group's check (quantization needs an adapter) must see it.
    pytest.importorskip("bitsandbytes")
    module = GRPO(policy={"model": "tiny", "quantization": "nf4"}, lora=True)
    assert module.policy_spec.lora and module.policy_spec.quantization == "nf4"


@pytest.mark.parametrize("targets", [["query_key_value"], r".*\.attention\.dense"])
def test_lora_target_modules_that_match_nothing(targets):
    module = GRPO(policy={"model": "tiny", "lora_target_modules": targets}, lora=True)
    with pytest.raises(ValueError, match=r"lora_target_modules.*(match no module|matches no module).*q_proj"):
        module.configure_model()


def test_lora_target_modules_regex_selects_layers():
    model = build_policy(PolicySpec(model="tiny", lora=True, lora_target_modules=r".*\.self_attn\.(q|v)_proj"), 49152)
    adapted = {n.split(".")[-4] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}


@pytest.fixture
def fresh_dtype_cache():
    precision._runs.cache_clear()
    yield
    precision._runs.cache_clear()


def test_a_dtype_the_device_cannot_run_is_a_clear_error(monkeypatch, fresh_dtype_cache):
    # Simulate a pre-Ampere GPU (no native bf16) and a device without fp16 kernels.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(precision, "_probe", _fails_for(torch.float16, torch.float32))
    with pytest.raises(ValueError, match=r"dtype='bfloat16' cannot run on device cuda: this GPU has no native bfloat16"):
        precision.check_dtype_runs("bfloat16", "cuda")
    with pytest.raises(ValueError, match=r"dtype='float16' cannot run on device cpu: RuntimeError: .*'Half'.*; use one of float32, bfloat16"):
        precision.check_dtype_runs("float16", "cpu")
    module = GRPO(policy={"model": "tiny", "dtype": "float16"})
    with pytest.raises(ValueError, match="dtype='float16' cannot run on device cpu"):
        module.configure_model()  # checked before any weights load
    assert module.policy is None


def _fails_for(*dtypes):
    real = precision._probe

    def probe(dtype, device):
        if dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return real(dtype, device)

    return probe


def test_every_dtype_runs_on_this_cpu(fresh_dtype_cache):
    for name in precision.DTYPES:
        precision.check_dtype_runs(name, "cpu")  # raises if this CPU could not train in it


def test_the_dtype_probe_leaves_the_random_generator_alone(fresh_dtype_cache):
    # It once drew from torch.randn, so the first policy built in a process got other LoRA
    # initial weights than a second one built after the same seed.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for name in precision.DTYPES:
        precision.check_dtype_runs(name, "cpu")
    assert torch.equal(torch.rand(3), expected)


def test_same_seed_same_lora_init_in_one_process(fresh_dtype_cache):
    import lightning as L

    inits = []
    for _ in range(2):
        L.seed_everything(0, verbose=False)
        module = GRPO(policy="tiny", lora=True, log={"validate_at_start": False})
        module.configure_model()
        inits.append({n: p.detach().clone() for n, p in module.named_parameters() if "lora_A" in n})
    assert inits[0] and all(torch.equal(inits[0][n], inits[1][n]) for n in inits[0])


def test_a_loaded_policy_trains_in_train_mode(tmp_path, tokenizer):
    from rftlab.models.loading import tiny_llama

    tiny_llama(len(tokenizer)).save_pretrained(tmp_path)  # from_pretrained returns eval mode
    model = build_policy(PolicySpec(model=str(tmp_path), lora=True), len(tokenizer))
    assert all(m.training for m in model.modules())


def _rollout(module, vary_reward):
    dm = RolloutDataModule(task=Arithmetic(num_test=2), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                           max_new_tokens=4)
    return dm.attach(module).next_minibatch()


def test_reference_kept_in_cpu_memory_is_outside_lightning_and_gives_the_same_logprobs(tiny_grpo, vary_reward):
    on_device = tiny_grpo(beta=0.1)
    on_cpu = tiny_grpo(beta=0.1, policy=PolicySpec(model="tiny", reference_placement="cpu"))
    assert any(n.startswith("ref_policy.") for n, _ in on_device.named_parameters())
    assert not any(n.startswith("ref_policy.") for n in on_cpu.state_dict()), "Lightning would move and save it"
    assert sum(p.numel() for p in on_cpu.parameters()) == sum(p.numel() for p in on_cpu.policy.parameters())
    batch = _rollout(on_device, vary_reward)
    torch.testing.assert_close(on_cpu.batched_logprobs(batch, reference=True), batch.ref_logp, rtol=0, atol=0)


def test_offloaded_reference_visits_the_device_for_each_forward(tiny_grpo, vary_reward, monkeypatch):
    module = tiny_grpo(beta=0.1, policy={"model": "tiny", "reference_placement": "offload"})
    moves = []
    original = type(module.ref_policy).to

    def spy(self, *args, **kwargs):
        moves.append(str(args[0]) if args else str(kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(module.ref_policy), "to", spy)
    batch = _rollout(module, vary_reward)
    assert batch.ref_logp is not None
    assert moves[:2] == [str(module.device), "cpu"], moves
    assert all(p.device.type == "cpu" for p in module.ref_policy.parameters())


def test_an_adapter_run_keeps_no_reference_copy(tiny_grpo):
    module = tiny_grpo(lora=True, beta=0.1, policy={"model": "tiny", "reference_placement": "cpu"})
    assert module.ref_policy is None


def test_scoring_a_rollout_keeps_a_frozen_submodule_in_eval_mode(tiny_grpo, vary_reward):
    module = tiny_grpo(beta=0.1)
    batch = _rollout(module, vary_reward)
    module.policy.train()
    frozen = decoder_layers(module.policy)[0]
    frozen.eval()
    module.batched_logprobs(batch)
    module.batched_logprobs(batch, reference=True)
    assert module.policy.training and not any(m.training for m in frozen.modules())
