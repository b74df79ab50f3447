"""Work done by a few GRPO training steps, counted rather than timed: torch ops and Python calls.

On a shared, noisy machine two timings of the same code differ by 10-20%; counts do not. This runs
``--steps`` GRPO + LoRA optimizer steps of the bundled model (1 prompt x 8 completions, 32 new
tokens, seed 0) with the rftlab found under ``--root`` (this checkout by default, or another
commit's checkout, e.g. ``git worktree add /tmp/rftlab-old <commit>``) and prints the number of
aten ops dispatched inside the training steps (forward, backward, optimizer; sampling excluded)
and the number of Python function calls of the whole run (sampling, scoring, model loading
included). Two commits doing the same work print the same op count:

    .venv/bin/python benchmarks/work_count.py --precision bf16-mixed
    .venv/bin/python benchmarks/work_count.py --precision bf16-mixed --root /tmp/rftlab-old

Checkouts from before the option groups (``num_generations`` on the algorithm) are recognised and
built with their own arguments.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import sys
import warnings
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the rftlab checkout to import")
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning precision, e.g. 32-true or bf16-mixed")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--policy", default="default")
    args = parser.parse_args()
    sys.path.insert(0, str(args.root))
    import lightning as L
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import rftlab
    from rftlab import GRPO, RolloutDataModule
    from rftlab.tasks import Arithmetic

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    grouped = hasattr(rftlab, "PolicySpec")  # the option-group API
    L.seed_everything(0, verbose=False)
    task = Arithmetic(num_test=0)
    if grouped:
        module = GRPO(policy=args.policy, lora=True, lr=2e-4, log={"validate_at_start": False})
        data = RolloutDataModule(task=task, prompts_per_step=1, num_generations=8, max_new_tokens=32)
    else:
        module = GRPO(policy=args.policy, lora=True, lr=2e-4, num_generations=8, validate_at_start=False)
        data = RolloutDataModule(task=task, prompts_per_step=1, max_new_tokens=32)

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter[str] = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    counter = Count()

    class InTrainingSteps(L.Callback):
        def on_train_batch_start(self, *_: object) -> None:
            counter.__enter__()

        def on_train_batch_end(self, *_: object) -> None:
            counter.__exit__(None, None, None)

    trainer = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, precision=args.precision,
                        callbacks=[InTrainingSteps()])
    profile = cProfile.Profile()
    profile.enable()
    trainer.fit(module, datamodule=data)
    profile.disable()
    print(json.dumps({"root": str(args.root), "api": "option groups" if grouped else "flat", "precision": args.precision,
                      "steps": args.steps, "aten_ops_in_training_steps": sum(counter.ops.values()),
                      "python_calls_whole_run": pstats.Stats(profile).total_calls,
                      "most_common_ops": counter.ops.most_common(5)}))


if __name__ == "__main__":
    main()
