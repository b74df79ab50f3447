"""The ``rftlab`` command: LightningCLI for fit/validate, configured by YAML (class_path/init_args).

    rftlab fit --config configs/grpo_arithmetic.yaml
    rftlab fit --config configs/grpo_arithmetic.yaml --model.init_args.lr 1e-4 --trainer.max_steps 20
    rftlab fit --imports [my_variants] --config my_config.yaml   (your registered plug-ins; see rftlab.core.plugins)
    rftlab compare --config configs/compare_arithmetic.yaml      (see rftlab/experiments/cli.py)
    rftlab evaluate --policy default --num_samples 8 --k [1,8]
    rftlab export --ckpt last.ckpt --out exported/ [--adapter_only]   (see rftlab/models/export.py)
    rftlab generate --ckpt last.ckpt --prompts "[Calculate 12 + 30.]"  (see rftlab/experiments/generation.py)
"""

from __future__ import annotations

import sys

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from rftlab.algorithms.base import RFTModule
from rftlab.callbacks import CompletionTable, TrainClock, WandbMetrics
from rftlab.callbacks.checkpointing import AtomicCheckpoints, ResumableCheckpoint
from rftlab.core.plugins import current_folder_on_path, import_plugins
from rftlab.rollout.datamodule import RolloutDataModule


def trainer_defaults() -> dict:
    """Trainer settings suited to RL fine-tuning; every one can be overridden in the YAML."""
    return {
        "log_every_n_steps": 1,
        # Online when logged in and the server answers, else offline with one warning (never a hang).
        "logger": {"class_path": "rftlab.callbacks.wandb.RFTWandbLogger", "init_args": {"project": "rftlab", "save_dir": "runs"}},
        # Persistent callbacks (LightningCLI adds them to whatever the YAML lists). AtomicCheckpoints
        # makes every checkpoint write atomic, whichever ModelCheckpoint the YAML configures.
        "callbacks": [TrainClock(), CompletionTable(every_n_steps=10), WandbMetrics(), AtomicCheckpoints()],
    }


class RFTCLI(LightningCLI):
    """LightningCLI whose default checkpointing suits RL runs: ``last.ckpt`` every 10 steps.

    Lightning's default ``ModelCheckpoint`` saves once per epoch, and an RL "epoch" is a pass over
    the prompts (hours); when the config lists no ModelCheckpoint, a ``ResumableCheckpoint`` takes
    its place, so ``rftlab fit ... --ckpt_path <run>/checkpoints/last.ckpt`` resumes exactly.
    ``--imports`` (or ``imports:`` in the YAML) imports the user's plug-in modules before any
    object is built, so registered names (``advantage: my_baseline``) resolve.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--imports", type=list[str], default=[],
                            help="modules or .py files to import first: your registered advantages, losses, classes")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        import_plugins(config.get("imports") or [])

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        callbacks = trainer.callbacks
        for i, callback in enumerate(callbacks):
            # The one Lightning adds by itself (enable_checkpointing=True and none configured).
            if type(callback) is ModelCheckpoint and callback.dirpath is None and callback._every_n_train_steps == 0 \
                    and callback.save_last is None and callback.monitor is None and callback._train_time_interval is None:
                callbacks[i] = ResumableCheckpoint(every_n_train_steps=10)
        return trainer


    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(short_message(str(err))) from err

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            raise ConfigError(describe_build_error(err)) from err


class ConfigError(ValueError):
    """A config that cannot be parsed or built; ``rftlab`` prints its message alone (``--debug``: the traceback)."""


#: Lines of jsonargparse's messages that repeat what the other lines say (the whole given value,
#: the union's other member "None").
_NOISE = ("Given value", "Subtypes:", "- Expected a <class 'NoneType'>", "Does not validate against any of the")


def short_message(message: str, width: int = 160) -> str:
    """A parser message without jsonargparse's repetitions, each line cut to ``width`` characters.

    Args:
        message: the parser's message.
        width: longest line kept whole.
    """
    lines = [line for line in message.splitlines() if line.strip() and not line.strip().startswith(_NOISE)]
    return "\n".join(line if len(line) <= width else line[: width - 3] + "..." for line in lines)


def describe_build_error(err: BaseException) -> str:
    """One line for an error raised while building the config's objects: the first error in the
    chain (what the constructor said, naming its parameter) and the class it was building.

    Args:
        err: the error LightningCLI's instantiation raised.
    """
    root = err
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    building = None
    tb = root.__traceback__
    while tb is not None:  # the innermost constructor call of the instantiator (jsonargparse's or Lightning's)
        cls = tb.tb_frame.f_locals.get("class_type")
        if isinstance(cls, type):
            building = cls
        tb = tb.tb_next
    where = f" (building {building.__module__}.{building.__qualname__})" if building is not None else ""
    return short_message(f"{type(root).__name__}: {root}") + where


class _ParseOnlyCLI(RFTCLI):
    def instantiate_trainer(self, **kwargs: Any) -> None:  # type: ignore[override]
        return None


def make_cli(args: list[str] | None = None, run: bool = True, trainer: bool = True) -> LightningCLI:
    """Build the LightningCLI (``run=False`` only parses and instantiates, as the config tests do).

    Args:
        args: command-line arguments (default: ``sys.argv``).
        run: run the subcommand (fit, validate, ...); False only builds the objects.
        trainer: also build the Trainer; False checks a config whose accelerator (GPU) or strategy
            (DeepSpeed) this machine lacks: everything else is parsed and instantiated.
    """
    cls = RFTCLI if trainer or run else _ParseOnlyCLI
    return cls(
        RFTModule,
        RolloutDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        # Parse errors raise (ConfigError) instead of printing the whole usage before the message.
        parser_kwargs={"exit_on_error": False},
        auto_configure_optimizers=False,
    )


# Subcommands that are not LightningCLI's (fit/validate): name -> "module:function", imported only
# when used so `rftlab fit` starts as fast as before. Each function takes the remaining arguments.
SUBCOMMANDS: dict[str, str] = {
    "compare": "rftlab.experiments.cli:compare_main",
    "evaluate": "rftlab.experiments.cli:evaluate_main",
    "export": "rftlab.models.export:export_main",
    "generate": "rftlab.experiments.generation:generate_main",
}


#: One line per subcommand, for ``rftlab --help`` (LightningCLI's own help lists only its four).
HELP = """usage: rftlab <subcommand> [options]     (rftlab <subcommand> --help for its options)

training (LightningCLI: a YAML config with trainer, model and data sections, or flags):
  fit        train an algorithm (rftlab.GRPO, DAPO, PPO, SegmentRFT, SFT or yours) on a DataModule
  validate   held-out evaluation of a config's model (greedy accuracy on the task's test split)
  test       LightningCLI's test loop
  predict    LightningCLI's predict loop

experiments and models:
  compare    train several variants under the same seeds and budget; table, figure, W&B runs
  evaluate   held-out greedy accuracy and pass@k of checkpoints
  export     a checkpoint as a folder transformers loads (or only its LoRA adapter)
  generate   answers of a checkpoint or model folder to prompts, or to a task's held-out rows

A config error prints one message naming the key; add --debug to see the whole traceback.
"""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``rftlab`` console script.

    Args:
        argv: the arguments after ``rftlab`` (default: ``sys.argv[1:]``).
    """
    given = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    current_folder_on_path()  # `class_path: my_variants.MyGRPO` resolves without PYTHONPATH=.
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return
    if argv[0] in SUBCOMMANDS:
        import importlib

        module, function = SUBCOMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
        if not given:
            sys.argv.remove("--debug")
    try:
        # From the console script LightningCLI reads sys.argv itself: passing the same arguments as
        # `args` too makes it warn on every call.
        make_cli(argv if given else None)
    except ConfigError as err:
        if debug:
            raise
        print(f"rftlab {argv[0]}: error: {err}\n(add --debug to see the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
