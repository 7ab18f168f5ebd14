"""The ``lightning-vlm`` command: a thin LightningCLI.

Model and data are chosen by import path (``class_path``), so a custom objective needs no registration.
Typos anywhere in the config, nested backbone and tiny-model settings included, fail at parse time with
the key named. The resolved config is saved with every run and sent to the logger (W&B keeps it).
``trainer.default_root_dir`` names the run folder: a logger, ``ModelCheckpoint`` or ``ExportHF`` given no
folder of its own writes there, and ``fit`` refuses a folder that holds another run's checkpoints or export.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import (
    BasePredictionWriter,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lightning_vlm.checkpoints import AtomicCheckpointIO, read_checkpoint
from lightning_vlm.data.base import VLMDataModule
from lightning_vlm.export import ExportHF
from lightning_vlm.objectives.base import VLMObjective, class_path, saved_objective
from lightning_vlm.progress import default_bar


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Save the resolved config to the run folder and hand it to the logger too."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Only fit saves: validate/predict would overwrite the run's config with their own.
        if stage == "fit":
            super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            trainer.logger.log_hyperparams(json.loads(self.parser.dump(self.config, format="json")))


class JsonlPredictionWriter(BasePredictionWriter):
    """Write ``predict`` outputs (one JSON object per row) to a JSONL file."""

    def __init__(self, path: str | None = None):
        """
        Args:
            path: Output file; defaults to ``predictions.jsonl`` in the run's log folder.
        """
        super().__init__(write_interval="batch")
        self.path = path
        self._file = None

    def on_predict_start(self, trainer, pl_module) -> None:
        path = Path(self.path or Path(trainer.log_dir or ".") / "predictions.jsonl")
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w")
        self.written = path

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        for row in prediction:
            self._file.write(json.dumps(row) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._file.close()
        print(f"predictions written to {self.written}")


class VLMCLI(LightningCLI):
    """LightningCLI with the lightning-vlm defaults: subclass mode, config saving, held-out report."""

    def __init__(self, *args: Any, **kwargs: Any):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _quiet()
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(
            VLMObjective, VLMDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--report_held_out",
            type=bool,
            default=False,
            help="fit: validate before and after training and print the held-out metrics side by side",
        )
        parser.add_argument(
            "--torch_threads",
            type=int | None,
            default=None,
            help="intra-op CPU threads of torch (default: torch's choice). Results on the CPU depend on "
            "it (the order of float reductions), so recipes whose figures are quoted pin it",
        )
        parser.add_argument(
            "--progress_every_n_steps",
            type=int | None,
            default=None,
            help="when stdout is not a terminal (nohup, SLURM, CI), a plain progress line every N optimiser "
            "steps replaces the live bar (default: trainer.log_every_n_steps)",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: write into a run folder (trainer.default_root_dir) that holds another run's checkpoints "
            "or export; without it such a fit is refused",
        )
        parser.add_lightning_class_args(JsonlPredictionWriter, "predictions")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        path = str(self.config[sub].get("ckpt_path") or "") if sub else ""
        if not path or path in ("best", "last", "hpc") or path.startswith("registry") or "://" in path:
            return
        try:  # before Lightning reads the checkpoint's hyperparameters into the model's config
            saved = saved_objective(read_checkpoint(path))
        except (OSError, ValueError) as error:
            _fail(error)
        recipe = class_path(self.config[sub].model.class_path)
        if saved not in (None, recipe):
            was, new = saved.rpartition(".")[2], recipe.rpartition(".")[2]
            _fail(
                f"--ckpt_path {path} was saved by the {was} objective ({saved}), but the recipe's model is "
                f"{new} ({recipe}): resume with a {was} recipe, or start {new} from that model through its "
                "export (an ExportHF folder as model.init_args.backbone.model_name_or_path)"
            )

    def _set_seed(self) -> None:
        # Lightning logs "Seed set to N" here; it is said once the classes are built (after_instantiate_classes),
        # so that an error in a class's settings is the first line printed.
        seed_log = logging.getLogger("lightning.fabric.utilities.seed")
        seed_log.disabled, disabled = True, seed_log.disabled
        try:
            super()._set_seed()
        finally:
            seed_log.disabled = disabled

    def after_instantiate_classes(self) -> None:
        seed = self._get(self.config, "seed_everything")
        if seed is not False:
            rank_zero_info(f"Seed set to {seed}")

    def instantiate_classes(self) -> None:
        trainer = (self.config[self.subcommand] if self.subcommand else self.config).trainer
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        run, unset = trainer.default_root_dir, []
        for args in [getattr(x, "init_args", None) or {} for x in loggers]:  # {} for logger: true/false
            if run and args.get("save_dir", "") in (None, ".") and not args.get("dir"):
                unset.append((args, args.save_dir))
                args.save_dir = run  # a save_dir left at its default (W&B's ".") is the run folder
        try:
            super().instantiate_classes()
            for args, default in unset:  # the saved config keeps it unset: one setting moves a repeat too
                args.save_dir = default
        except ValueError as error:  # jsonargparse wraps what an __init__ raised in a dump of the config
            cause = error
            while _in_jsonargparse(cause) and cause.__cause__ is not None:
                cause = cause.__cause__
            if cause is error or _in_jsonargparse(cause) or not isinstance(cause, (ValueError, OSError)):
                raise
            _fail(cause)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("torch_threads"):
            import torch

            torch.set_num_threads(config["torch_threads"])
        if config.get("trainer", {}).get("enable_progress_bar") is False or not sys.stdout.isatty():
            import datasets  # no live bar: no bars of datasets' row checks or transformers' loading either
            from transformers.utils import logging as transformers_logging

            datasets.disable_progress_bars()
            transformers_logging.disable_progress_bar()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            every = self._get(self.config_init, "progress_every_n_steps")
            kwargs.setdefault("callbacks", [*callbacks, default_bar(sys.stdout, every)])
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:  # Lightning gives W&B anonymous=None, which W&B warns is deprecated
            if getattr(logger, "_wandb_init", {}).get("anonymous", 0) is None:
                logger._wandb_init.pop("anonymous")
        if not trainer.loggers:  # a recipe run with `--trainer.logger false`: no logger to show the lr in
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not the user's
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        run = trainer.default_root_dir  # the run folder (Lightning: the current directory when unset)
        local = run if "://" in run else os.path.realpath(run)  # as ModelCheckpoint keeps a given dirpath
        folders = [(c.folder(trainer), "export") for c in trainer.callbacks if isinstance(c, ExportHF)]
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                callback.dirpath = callback.dirpath or os.path.join(local, "checkpoints")
                folders.append((callback.dirpath, "checkpoints"))
        if self.subcommand == "fit" and not (self.config.fit.overwrite or self.config.fit.ckpt_path):
            for folder, what in folders:  # a rerun or a variant would write over what later stages load
                if "://" not in str(folder) and any(Path(folder).glob("*")):
                    _fail(
                        f"{folder} holds another run's {what} (run folder {run}): name a new run folder with "
                        "--trainer.default_root_dir, write over it with --overwrite true, or resume with --ckpt_path"
                    )
        return trainer

    def _held_out(self, ckpt_path: str | None = None) -> dict[str, float]:
        results = self.trainer.validate(
            self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False
        )
        return {k: float(v) for k, v in (results[0] if results else {}).items()}

    def before_fit(self) -> None:
        fit = self.config.fit  # resumed: the held-out metrics of the checkpoint
        self._before = self._held_out(fit.ckpt_path) if fit.report_held_out else None

    def after_fit(self) -> None:
        if self._before is None or self.trainer.interrupted:
            return
        after = self._held_out()
        if self.trainer.is_global_zero:
            keys = sorted(set(self._before) | set(after))
            width = max([16, *map(len, keys)])
            print(f"\n{'held-out metrics':<{width + 2}}     before      after")
            for key in keys:
                before, now = self._before.get(key, float("nan")), after.get(key, float("nan"))
                print(f"  {key:<{width}} {before:>10.4f} {now:>10.4f}")


def _in_jsonargparse(error: BaseException) -> bool:
    """Whether jsonargparse raised ``error`` (a wrapper of what a class's ``__init__`` raised)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("jsonargparse")


def _fail(error: BaseException | str) -> NoReturn:
    """End the command with this message as the first and last line it prints (exit status 2, as for a typo)."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2)


def _quiet() -> None:
    """Silence what the user cannot act on: Lightning's tips to install its cloud products, and its own
    deprecated use of torch's pytree API."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_not_a_tip)  # once: a filter already there is not added again
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def main(args: list[str] | None = None) -> None:
    # A console script's path starts at its own folder, not at the current directory as `python -m`'s does.
    # Appended, so the user's modules there work as class_path and never shadow an installed package.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    VLMCLI(args=args)


if __name__ == "__main__":
    main()
