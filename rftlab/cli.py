"""The ``rftlab`` command: LightningCLI for fit/validate, configured by YAML (class_path/init_args).

    rftlab fit --config configs/grpo_arithmetic.yaml
    rftlab fit --config configs/grpo_arithmetic.yaml --model.init_args.lr 1e-4 --trainer.max_steps 20
    rftlab compare --config configs/compare_arithmetic.yaml      (see rftlab/experiments/cli.py)
    rftlab evaluate --policy default --num_samples 8 --k [1,8]
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from rftlab.algorithms.base import RFTModule
from rftlab.callbacks import CompletionTable, TrainClock, WandbMetrics
from rftlab.callbacks.wandb import wandb_mode
from rftlab.rollout.datamodule import RolloutDataModule


def trainer_defaults() -> dict:
    """Trainer settings suited to RL fine-tuning; every one can be overridden in the YAML."""
    return {
        "log_every_n_steps": 1,
        "logger": {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"project": "rftlab", "save_dir": "runs", "offline": wandb_mode() != "online"},
        },
        # Persistent callbacks (LightningCLI adds them to whatever the YAML lists).
        "callbacks": [TrainClock(), CompletionTable(every_n_steps=10), WandbMetrics()],
    }


def make_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build the LightningCLI (``run=False`` only parses and instantiates, as the config tests do)."""
    return LightningCLI(
        RFTModule,
        RolloutDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


# Subcommands that are not LightningCLI's (fit/validate): name -> "module:function", imported only
# when used so `rftlab fit` starts as fast as before. Each function takes the remaining arguments.
SUBCOMMANDS: dict[str, str] = {
    "compare": "rftlab.experiments.cli:compare_main",
    "evaluate": "rftlab.experiments.cli:evaluate_main",
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``rftlab`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        module, function = SUBCOMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    make_cli(argv)


if __name__ == "__main__":
    main()
