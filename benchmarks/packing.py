"""Packed rows against the padded layout: forward + backward time of the training loss, side by side.

For each shape (G completions x T tokens of one prompt) the same batch runs through
``completion_forward`` with ``packing="never"`` (the prompt's key/value cache shared by G padded rows)
and ``packing="always"`` (one packed row), alternating, and the loss (mean token log-prob) is
backpropagated. "Ragged" shapes draw completion lengths in [T/3, T] with a third of them at T (as in
a real rollout: some run to the limit); "full" shapes have every completion at T (nothing to save,
only the packed row's longer attention to pay). The last column is what ``packing="auto"`` picks.

    .venv/bin/python benchmarks/packing.py --out benchmarks/results/packing.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

SHAPES = ["8x32", "4x64", "8x64", "16x32", "4x128", "8x128", "16x64",
          "8x32f", "8x64f", "8x128f", "16x64f", "16x96", "16x128"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="default", help="model name or path")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True, help="LoRA r16 on q/k/v/o")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="GxT, suffix f: every completion at T")
    parser.add_argument("--prompt-tokens", type=int, default=36, help="prompt length")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per layout (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON file to write")
    return parser.parse_args(argv)


def parse_shape(spec: str) -> tuple[int, int, bool]:
    """'8x32' -> (8, 32, False); '8x32f' -> (8, 32, True): G, T, every completion at T."""
    full = spec.endswith("f")
    g, t = spec.rstrip("f").split("x")
    return int(g), int(t), full


def make_batch(G: int, T: int, full: bool, prompt_tokens: int, seed: int = 1) -> tuple:
    """One prompt repeated G times and G completions of random tokens; lengths as in the docstring."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(100, 40000, (1, prompt_tokens), generator=g).repeat(G, 1)
    lengths = torch.full((G,), T) if full else torch.randint(T // 3, T + 1, (G,), generator=g)
    lengths[: G // 3] = T
    completion_ids = torch.randint(100, 40000, (G, T), generator=g)
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return prompt_ids, torch.ones_like(prompt_ids), completion_ids, completion_mask


def time_layouts(module: Any, batch: tuple, repeats: int) -> dict[str, list[float]]:
    """Seconds per forward + backward for each layout, alternating never/always, warm-up dropped."""
    import torch

    from rftlab.core import selective_log_softmax
    from rftlab.models.policy import completion_forward

    times: dict[str, list[float]] = {"never": [], "always": []}
    for i in range(2 * (repeats + 1)):
        packing = ("never", "always")[i % 2]
        with module.precision_context():
            start = time.perf_counter()
            logits = completion_forward(module.policy, *batch, packing=packing).logits
            logp = selective_log_softmax(logits, batch[2])
            ((logp * batch[3]).sum() / batch[3].sum()).backward()
            times[packing].append(time.perf_counter() - start)
        module.policy.zero_grad(set_to_none=True)
    return {k: v[1:] for k, v in times.items()}


def main() -> None:
    args = parse_args()
    import torch

    from rftlab import GRPO
    from rftlab.models.packing import attention_pair_cost, packing_pays

    torch.set_num_threads(args.threads)
    module = GRPO(policy=dict(model=args.policy, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                  lora=args.lora, log=dict(validate_at_start=False))
    module.configure_model()
    module.policy.train()
    pair_cost = attention_pair_cost(module.policy)
    rows = []
    for spec in args.shapes.split(","):
        G, T, full = parse_shape(spec)
        batch = make_batch(G, T, full, args.prompt_tokens)
        times = time_layouts(module, batch, args.repeats)
        never, always = statistics.median(times["never"]), statistics.median(times["always"])
        auto = packing_pays(batch[1], batch[3], torch.zeros(G, dtype=torch.long), pair_cost)
        row = {"shape": spec, "real_tokens": int(batch[3].sum()), "padded_tokens": G * T,
               "packed_row": args.prompt_tokens + int(batch[3].sum()), "padded_s": never, "packed_s": always,
               "ratio": always / never, "auto_packs": auto, "times": times}
        rows.append(row)
        print(f"{spec:>7}  real {row['real_tokens']:>5}/{G * T:<5} padded {never:.3f} s  packed {always:.3f} s  "
              f"ratio {always / never:.2f}  auto {'packs' if auto else 'pads'}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "pair_cost": pair_cost, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
