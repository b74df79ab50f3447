"""Multi-turn episodes: the layout of turns and observations, the KV cache, truncation, faults, columns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rftlab import RolloutDataModule
from rftlab.core import selective_log_softmax
from rftlab.environments import Environment, Step
from rftlab.models.hf import stop_token_ids
from rftlab.models.policy import completion_logits
from rftlab.rollout.episodes import (EpisodeDriver, ObservationEncoder, as_fallback_messages, decode_episodes,
                                     episode_metrics, observation_text)
from rftlab.rollout.sampler import SamplingParams, sampling_mode
from rftlab.tasks import RowsTask


class Scripted(nn.Module):
    """A policy that writes ``script[n]`` after n attended tokens (any unknown n: ``default``).

    Wraps the tiny model so the KV cache and forwards are real; only the logits are replaced.
    """

    def __init__(self, inner: nn.Module, script: dict[int, int], default: int) -> None:
        super().__init__()
        self.inner, self.script, self.default = inner, script, default

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        seen = kwargs["attention_mask"].sum(-1).tolist()
        forced = torch.tensor([self.script.get(int(n), self.default) for n in seen])
        logits = torch.full_like(out.logits[:, -1:], -1e4)
        logits[torch.arange(len(seen)), 0, forced] = 0.0
        out.logits = logits
        return out


class TryAgain(Environment):
    """Answers "try again" until the model has taken ``turns`` turns; each step rewards 0.5."""

    def __init__(self, turns: int = 2) -> None:
        self.turns, self.n = turns, 0

    def step(self, text: str) -> Step:
        self.n += 1
        return Step([{"role": "user", "content": f"try again {self.n}"}], done=self.n >= self.turns, reward=0.5)


def _driver(tokenizer, n, env=TryAgain, max_turns=4):
    return EpisodeDriver([env() for _ in range(n)], ObservationEncoder(tokenizer, native_tools=False), tokenizer,
                         max_turns)


@pytest.fixture
def policy(tiny_grpo):
    module = tiny_grpo()
    return module, stop_token_ids(module.policy, module.tokenizer)


def _prompt(tokenizer, text="Hi"):
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)


def test_hand_built_two_turn_episode_layout(policy, tokenizer):
    module, eos = policy
    prompt_ids, prompt_mask = _prompt(tokenizer)
    P = prompt_ids.shape[1]
    a, b, c = (tokenizer.convert_tokens_to_ids(t) for t in ("a", "b", "c"))
    obs = ObservationEncoder(tokenizer, native_tools=False).encode([{"role": "user", "content": "try again 1"}], eos[0])
    k = len(obs)
    # turn 1: a b EOS; observation (k tokens); turn 2: c EOS
    script = {P: a, P + 1: b, P + 2: eos[0], P + 3 + k: c, P + 4 + k: eos[0]}
    model = Scripted(module.policy, script, default=b)
    with sampling_mode(module.policy):
        out = decode_episodes(model, prompt_ids, prompt_mask, 2, SamplingParams(max_new_tokens=40, greedy=True), eos,
                              tokenizer.pad_token_id, _driver(tokenizer, 2).respond, max_turns=4)
    expected = [a, b, eos[0], *obs, c, eos[0]]
    assert out.completion_ids.tolist() == [expected, expected]
    assert out.completion_mask[0].tolist() == [1, 1, 1] + [0] * k + [1, 1]  # the loss sees the model's tokens only
    assert out.env_mask[0].tolist() == [0, 0, 0] + [1] * k + [0, 0]
    assert out.turns.tolist() == [2, 2] and out.truncated.tolist() == [False, False]
    # the observation is the template's own markup: the turn's <|im_end|>, then a user turn, then the assistant's
    assert tokenizer.decode(expected[2:3 + k]) == "<|im_end|>\n<|im_start|>user\ntry again 1<|im_end|>\n<|im_start|>assistant\n"


def test_budget_and_max_turns_truncate(policy, tokenizer):
    module, eos = policy
    prompt_ids, prompt_mask = _prompt(tokenizer)
    P = prompt_ids.shape[1]
    a = tokenizer.convert_tokens_to_ids("a")
    encoder = ObservationEncoder(tokenizer, native_tools=False)
    k = len(encoder.encode([{"role": "user", "content": "try again 1"}], eos[0]))
    script = {P: a, P + 1: eos[0], P + 2 + k: a, P + 3 + k: eos[0]}
    model = Scripted(module.policy, script, default=a)
    params = SamplingParams(max_new_tokens=60, greedy=True)
    with sampling_mode(module.policy):
        # max_turns=1: the environment wants another turn, there is none -> truncated
        one = decode_episodes(model, prompt_ids, prompt_mask, 1, params, eos, tokenizer.pad_token_id,
                              _driver(tokenizer, 1, lambda: TryAgain(5)).respond, max_turns=1)
        # a budget of 5 tokens: turn 1 fits (2), the observation does not -> truncated after turn 1
        tight = decode_episodes(model, prompt_ids, prompt_mask, 1, SamplingParams(max_new_tokens=5, greedy=True), eos,
                                tokenizer.pad_token_id, _driver(tokenizer, 1).respond, max_turns=4)
        # the second turn never samples EOS ("a" forever after it): cut by the budget inside the turn
        endless = decode_episodes(Scripted(module.policy, {P: a, P + 1: eos[0]}, default=a), prompt_ids, prompt_mask, 1, SamplingParams(max_new_tokens=k + 10, greedy=True),
                                  eos, tokenizer.pad_token_id, _driver(tokenizer, 1).respond, max_turns=4)
    assert one.truncated.tolist() == [True] and one.turns.tolist() == [1] and one.env_mask.sum() == 0
    assert tight.truncated.tolist() == [True] and tight.completion_ids.shape[1] == 2
    assert endless.completion_ids.shape[1] == k + 10 and endless.truncated.tolist() == [True]


def test_kv_cache_reuse_equals_a_fresh_forward_of_the_whole_episode(policy, tokenizer):
    module, eos = policy
    lm = module.policy.get_output_embeddings()
    head = nn.Linear(lm.in_features, lm.out_features, bias=True)
    with torch.no_grad():  # make EOS likely, so turns end and observations come in
        head.weight.copy_(lm.weight)
        head.bias.zero_()
        head.bias[eos[0]] = 10.0
    module.policy.set_output_embeddings(head)
    prompts = [_prompt(tokenizer, t) for t in ("Hi", "What is two plus two, please?")]
    width = max(p[0].shape[1] for p in prompts)
    prompt_ids = torch.stack([torch.cat([torch.full((width - p[0].shape[1],), tokenizer.pad_token_id), p[0][0]]) for p in prompts])
    prompt_mask = (torch.arange(width) >= (width - torch.tensor([p[0].shape[1] for p in prompts])).unsqueeze(1)).long()
    torch.manual_seed(0)
    with sampling_mode(module.policy):
        out = decode_episodes(module.policy, prompt_ids, prompt_mask, 3, SamplingParams(max_new_tokens=48), eos,
                              tokenizer.pad_token_id, _driver(tokenizer, 6, lambda: TryAgain(3)).respond, max_turns=3,
                              logprobs=True)
        assert out.env_mask.sum() > 0 and (out.turns > 1).any()  # the test exercises several turns
        rep_ids, rep_mask = prompt_ids.repeat_interleave(3, 0), prompt_mask.repeat_interleave(3, 0)
        logits = completion_logits(module.policy, rep_ids, rep_mask, out.completion_ids,
                                   out.completion_mask + out.env_mask, share_prompt=False)
    fresh = selective_log_softmax(logits, out.completion_ids)
    model_tokens = out.completion_mask.bool()
    torch.testing.assert_close(out.logps[model_tokens], fresh[model_tokens], atol=1e-4, rtol=1e-4)
    assert torch.equal(out.logps[~model_tokens], torch.zeros(int((~model_tokens).sum())))


def test_observation_rendering_with_and_without_tool_support(tokenizer):
    tool = [{"role": "tool", "name": "add", "content": "5"}, {"role": "tool", "name": "add", "content": "6"}]
    assert as_fallback_messages(tool) == [{"role": "user", "content":
                                           "<tool_response>\n5\n</tool_response>\n<tool_response>\n6\n</tool_response>"}]
    text = observation_text(tool, tokenizer, native_tools=False)
    assert text == ("<|im_end|>\n<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\n6\n"
                    "</tool_response><|im_end|>\n<|im_start|>assistant\n")
    encoder = ObservationEncoder(tokenizer, native_tools=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with_end = encoder.encode(tool, last_token=None)
    assert with_end[0] == im_end and encoder.encode(tool, last_token=im_end) == with_end[1:]


class Explodes(Environment):
    def step(self, text):
        raise RuntimeError("environment bug")


def test_an_environment_that_raises_ends_its_episode_only(tokenizer):
    envs = [Explodes(), TryAgain(3)]
    driver = EpisodeDriver(envs, ObservationEncoder(tokenizer, False), tokenizer, max_turns=3)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    a = tokenizer.convert_tokens_to_ids("a")
    answers = driver.respond([0, 1], [[a, im_end], [a, im_end]])
    assert answers[0] is None and answers[1] is not None
    logs = driver.finish()
    assert logs[0].failed and not logs[1].failed and logs[1].env_reward == 0.5
    metrics = episode_metrics(logs, torch.tensor([1, 1]), torch.tensor([False, True]), driver.env_seconds)
    assert metrics["episodes/env_failures"] == 1.0 and metrics["episodes/budget_ended_ratio"] == 0.5


def test_tool_metrics_per_episode_and_per_tool(tokenizer):
    from rftlab.environments import calculator, environment_factory

    make = environment_factory(None, [calculator], 5.0)
    driver = EpisodeDriver([make(), make()], ObservationEncoder(tokenizer, False), tokenizer, max_turns=3)
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call><|im_end|>'
    turns = [tokenizer(call % "12 * 3", add_special_tokens=False)["input_ids"],
             tokenizer(call % "import os" + "", add_special_tokens=False)["input_ids"]]
    answers = driver.respond([0, 1], turns)
    assert all(a is not None for a in answers)
    assert "36" in tokenizer.decode(answers[0]) and "Error" in tokenizer.decode(answers[1])
    done = driver.respond([0], [tokenizer("It is 36.<|im_end|>", add_special_tokens=False)["input_ids"]])
    assert done == [None]
    logs = driver.finish()
    assert logs[0].turns == ['<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 3"}}</tool_call>',
                             "It is 36."]
    assert [m["role"] for m in logs[0].messages] == ["assistant", "tool", "assistant"]
    m = episode_metrics(logs, torch.tensor([2, 1]), torch.tensor([False, True]), driver.env_seconds)
    assert m["tools/calls_per_episode"] == 1.0 and m["tools/calculator/calls_per_episode"] == 1.0
    assert m["tools/errors"] == 1.0 and m["tools/errors/raised"] == 1.0 and m["tools/timeouts"] == 0.0


def test_rewards_get_the_whole_episode_and_its_columns(policy, tokenizer):
    module, eos = policy
    seen = {}

    def record(completions, turns=None, messages=None, env_reward=None, **_):
        seen.update(completions=completions, turns=turns, messages=messages, env_reward=env_reward)
        return [float(len(t)) for t in turns]

    task = RowsTask([{"prompt": [{"role": "user", "content": "Hi"}]}], {"turns": record})
    dm = RolloutDataModule(task=task, environment=lambda: TryAgain(2), max_turns=3, max_new_tokens=30,
                           prompts_per_step=1, num_generations=2)
    prompt_ids, prompt_mask = _prompt(tokenizer)
    P = prompt_ids.shape[1]
    a = tokenizer.convert_tokens_to_ids("a")
    k = len(ObservationEncoder(tokenizer, False).encode([{"role": "user", "content": "try again 1"}], eos[0]))
    module.policy = Scripted(module.policy, {P: a, P + 1: eos[0], P + 2 + k: a, P + 3 + k: eos[0]}, default=a)
    rollout = dm.attach(module).build_rollout()
    assert seen["turns"] == [["a", "a"], ["a", "a"]] and seen["env_reward"] == [1.0, 1.0]
    assert "try again 1" in seen["completions"][0] and seen["messages"][0][1] == {"role": "user", "content": "try again 1"}
    assert rollout.rewards.tolist() == [2.0, 2.0]
    assert rollout.env_mask.sum(-1).tolist() == [k, k] and rollout.completion_mask.sum(-1).tolist() == [4, 4]
    assert rollout.metrics["episodes/turns_mean"] == 2.0 and rollout.metrics["episodes/budget_ended_ratio"] == 0.0
    from rftlab.callbacks.samples import sample_rows

    table = sample_rows(rollout, 1)  # the sample table shows the whole episode
    assert table[0]["turns"] == 2 and table[0]["env_tokens"] == k and "try again 1" in table[0]["completion"]


def test_bad_multi_turn_settings_are_refused_at_construction():
    task = RowsTask([{"prompt": "x"}], {"r": lambda completions, **_: [0.0] * len(completions)})
    with pytest.raises(ValueError, match="max_turns"):
        RolloutDataModule(task=task, environment=TryAgain, max_turns=0)
    with pytest.raises(ValueError, match="tool_timeout"):
        RolloutDataModule(task=task, environment=TryAgain, tool_timeout=0)
    with pytest.raises(ValueError, match="sampler_backend='hf'.*multi-turn"):
        RolloutDataModule(task=task, environment=TryAgain, sampler_backend="hf")


TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_with_tool_support_renders_the_schemas_and_the_tool_role(tokenizer):
    import copy

    from rftlab.environments import calculator
    from rftlab.rollout.episodes import template_supports_tools

    native = copy.deepcopy(tokenizer)
    native.chat_template = TOOL_TEMPLATE
    assert template_supports_tools(native) and not template_supports_tools(tokenizer)
    task = RowsTask([{"prompt": [{"role": "user", "content": "2 * 3?"}]}], {"r": lambda completions, **_: [0.0]})
    dm = RolloutDataModule(task=task, tools=[calculator])
    (text,), _, _ = dm.encode_prompts(task.train_rows(), native)
    assert text == "<|im_start|>system\nTools: calculator <|im_end|>\n<|im_start|>user\n2 * 3?<|im_end|>\n<|im_start|>assistant\n"
    (fallback,), _, _ = dm.encode_prompts(task.train_rows(), tokenizer)  # SmolLM2's template: instructions
    assert "<tools>" in fallback and '"name": "calculator"' in fallback and "<tool_call>" in fallback
    result = [{"role": "tool", "name": "calculator", "content": "6"}]
    assert observation_text(result, native, native_tools=True) == (
        "<|im_end|>\n<|im_start|>tool\n6<|im_end|>\n<|im_start|>assistant\n")
