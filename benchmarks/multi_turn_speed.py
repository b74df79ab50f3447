"""Multi-turn sampling speed: 1, 2 and 4 turns per episode against single-turn sampling of as many tokens.

Each episode of ``--turns N`` samples N turns of ``--turn-tokens`` model tokens, with a tool
observation (the chat markup around "Result: 12345678", a dozen tokens) between two turns; the
single-turn reference samples N x ``--turn-tokens`` tokens in one completion. To make lengths
exact, the policy is wrapped so that EOS is sampled exactly at the end of each turn and never
elsewhere (one masked fill per step; the distribution over the other tokens is the model's).
Rounds alternate the settings; medians of model tokens per second are reported.

    .venv/bin/python benchmarks/multi_turn_speed.py --repeats 5 --turn-tokens 32

Writes --out (JSON): per setting the median seconds and model tokens/s, and the ratio to single-turn.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from rftlab import GRPO, RolloutDataModule
from rftlab.environments import Environment, Step
from rftlab.models.hf import stop_token_ids
from rftlab.rollout.episodes import EpisodeDriver, ObservationEncoder, decode_episodes
from rftlab.rollout.sampler import SamplingParams, sample_completions, sampling_mode
from rftlab.tasks import Arithmetic


class FixedTurns(nn.Module):
    """The policy, with EOS forced after every ``turn`` model tokens and forbidden before.

    Turn boundaries are found from the number of attended completion tokens: with observations of
    ``obs`` tokens, turn i ends at completion position i * (turn + obs) + turn - 1.
    """

    def __init__(self, inner: nn.Module, prompt_len: torch.Tensor, turn: int, obs: int, eos: int) -> None:
        super().__init__()
        self.inner, self.prompt_len, self.turn, self.obs, self.eos = inner, prompt_len, turn, obs, eos

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        attended = kwargs["attention_mask"].sum(-1)
        # Rows are the episodes still in the batch; all share one prompt length here.
        done = attended - self.prompt_len  # completion tokens attended, the next one is sampled
        end = (done % (self.turn + self.obs)) == self.turn - 1
        logits = out.logits[:, -1]
        logits[:, self.eos] = -1e4
        logits[end] = -1e4
        logits[end, self.eos] = 1e4
        return out


class Tool(Environment):
    """Answers each of the first ``turns - 1`` turns with the same tool result, then ends."""

    def __init__(self, turns: int) -> None:
        self.turns, self.n = turns, 0

    def step(self, text: str) -> Step:
        self.n += 1
        return Step([{"role": "tool", "name": "calculator", "content": "Result: 12345678"}], done=self.n >= self.turns)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gens", type=int, default=8, help="episodes (one prompt, G episodes)")
    parser.add_argument("--turn-tokens", type=int, default=32)
    parser.add_argument("--turns", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora", action="store_true", help="sample from the LoRA policy (as training does)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/multi_turn_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    module = GRPO(policy="default", lora=args.lora)
    module.configure_model()
    tok = module.tokenizer
    eos = stop_token_ids(module.policy, tok)[0]
    dm = RolloutDataModule(task=Arithmetic(), prompts_per_step=1, num_generations=args.gens).attach(module)
    _, ids, mask = dm.encoder.encode([dm.train_rows[0]["prompt"]], tok)
    obs = ObservationEncoder(tok, native_tools=False)
    k = len(obs.encode([{"role": "tool", "name": "calculator", "content": "Result: 12345678"}], eos))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    turn_counts = [int(t) for t in args.turns.split(",")]
    settings = [f"{n}-turn" for n in turn_counts] + [f"single {n * args.turn_tokens}" for n in turn_counts]
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in settings}
    for repeat in range(args.repeats + 1):  # round 0 warms up and is not counted
        order = settings if repeat % 2 == 0 else settings[::-1]
        for setting in order:
            n = int(setting.split("-")[0]) if setting.endswith("turn") else int(setting.split()[1]) // args.turn_tokens
            torch.manual_seed(repeat)
            start = time.perf_counter()
            with autocast, sampling_mode(module.policy):
                if setting.endswith("turn"):
                    model = FixedTurns(module.policy, mask.sum(), args.turn_tokens, k, eos)
                    driver = EpisodeDriver([Tool(n) for _ in range(args.gens)], obs, tok, max_turns=n)
                    params = SamplingParams(max_new_tokens=n * (args.turn_tokens + k), temperature=1.0)
                    out = decode_episodes(model, ids, mask, args.gens, params, [eos], tok.pad_token_id,
                                          driver.respond, n, logprobs=True)
                    tokens = int(out.completion_mask.sum())
                    assert (out.turns == n).all(), out.turns
                else:
                    params = SamplingParams(max_new_tokens=n * args.turn_tokens, temperature=1.0, ignore_eos=True)
                    _, out_mask, _, _ = sample_completions(module.policy, ids, mask, args.gens, params, [eos],
                                                           tok.pad_token_id, logprobs=True)
                    tokens = int(out_mask.sum())
            seconds = time.perf_counter() - start
            if repeat:
                runs[setting].append({"seconds": seconds, "tokens": tokens})
    summary: dict[str, dict[str, float]] = {}
    for setting, rs in runs.items():
        summary[setting] = {"median_seconds": round(statistics.median(r["seconds"] for r in rs), 3),
                            "median_tokens_per_s": round(statistics.median(r["tokens"] / r["seconds"] for r in rs), 1),
                            "model_tokens": rs[0]["tokens"]}
    for n in turn_counts:
        multi, single = summary[f"{n}-turn"], summary[f"single {n * args.turn_tokens}"]
        multi["tokens_per_s_vs_single"] = round(multi["median_tokens_per_s"] / single["median_tokens_per_s"], 3)
    result = {"summary": summary, "observation_tokens": k, "settings": vars(args), "runs": runs}
    print(json.dumps({"summary": summary, "observation_tokens": k}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
