"""The shared base LightningModule: backbone, optimiser and schedule, guards, checkpoint hygiene.

Every objective subclasses :class:`VLMObjective` (one level of inheritance) and adds only its
maths and metrics. Lightning owns the loop, devices, precision, checkpoints and logging.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from lightning_vlm.data.base import ResumableSampler
from lightning_vlm.model.backbone import VLMBackbone
from lightning_vlm.model.config import BackboneConfig, as_backbone_config

_NOT_RESUMABLE = "You're resuming from a checkpoint that ended before the epoch ended"


class VLMObjective(L.LightningModule):
    """Base of all objectives."""

    need_reference: bool = False
    # Dropout off unless ``backbone.disable_dropout`` says otherwise: log-probs compared across forwards
    # (ratios, preference margins) must not differ at equal weights. SFT keeps it as a regulariser.
    disable_dropout: bool = True
    if TYPE_CHECKING:  # the saved __init__ arguments, read as attributes (self.hparams.beta)

        @property
        def hparams(self) -> Any: ...

    def __init__(
        self,
        backbone: BackboneConfig,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: Literal["constant", "cosine", "linear"] = "constant",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_nonfinite_steps: int = 5,
    ):
        """
        Args:
            backbone: The VLM to train (see ``BackboneConfig``: model, LoRA, vision tower, ...).
            lr: Peak learning rate of the default AdamW.
            weight_decay: Decoupled weight decay of the default AdamW.
            warmup_steps: Linear warm-up steps of the default schedule.
            schedule: Default schedule after warm-up: ``constant``, ``cosine`` or ``linear`` decay to 0
                at ``trainer.max_steps`` (or the estimated total steps).
            optimizer: Replace the default AdamW, e.g. ``{class_path: torch.optim.SGD, init_args: {lr: 0.1}}``
                (``lr`` and ``weight_decay`` above then do not apply: set them in ``init_args``).
            lr_scheduler: Replace the default schedule (stepped every optimisation step).
            max_nonfinite_steps: A step whose loss is NaN/inf is skipped and counted; this many in a
                row stop the run.
        """
        super().__init__()
        rules = {"lr": (lr, lr > 0, "> 0"), "weight_decay": (weight_decay, weight_decay >= 0, ">= 0"),
                 "warmup_steps": (warmup_steps, warmup_steps >= 0, ">= 0"),
                 "max_nonfinite_steps": (max_nonfinite_steps, max_nonfinite_steps >= 1, ">= 1")}  # fmt: skip
        for key, (value, ok, rule) in rules.items():
            if not ok:  # checked here, before anything loads
                raise ValueError(f"model.init_args.{key} must be {rule}, got {value}")
        backbone = as_backbone_config(backbone)
        self.save_hyperparameters()  # collects the subclass's __init__ arguments too
        # Checkpoints load with weights_only: keep hyperparameters plain (dicts, not dataclasses or
        # Python callables). The callables themselves are kept on the module.
        self.hparams["backbone"] = asdict(backbone)
        for key in ("optimizer", "lr_scheduler"):
            if not isinstance(self.hparams.get(key), (dict, type(None))):
                self.hparams[key] = None
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.backbone = VLMBackbone(backbone, self.need_reference, self.disable_dropout)
        self.nonfinite_steps = 0  # consecutive
        self.nonfinite_total = 0
        # Checkpoints hold trainable weights only; frozen ones come from the pretrained folder.
        self.strict_loading = False

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy (FSDP2)
        if mesh is None:
            self.load_models()
            return
        from lightning_vlm.model.parallel import data_parallel_mesh, load_sharded, shard_rest

        backbones = [m for m in self.modules() if isinstance(m, VLMBackbone)]
        load_sharded(backbones, self.load_models, data_parallel_mesh(mesh))
        shard_rest(self, data_parallel_mesh(mesh))

    def load_models(self) -> None:
        """Load the weights (idempotent). An objective with more models (PPO's critic) loads them here."""
        self.backbone.load()

    def trainable_named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def token_mean_over_ranks(self, loss: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's token-mean ``loss`` (over ``tokens``), rescaled to its share of the token mean over
        every rank's batch: DDP averages the ranks' gradients, which would weight each rank equally."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1 or not torch.is_grad_enabled():
            return loss
        total = self.trainer.strategy.reduce(tokens.detach().clone(), reduce_op="sum").clamp(min=1.0)
        return loss * tokens.detach() * world / total

    def guard(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Return ``loss``, or None (skip the step) when it is not finite; stop when that repeats."""
        finite = bool(torch.isfinite(loss))
        if self._trainer is not None:  # every rank must skip together, or DDP's all-reduce hangs
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.nonfinite_steps = 0
            return loss
        self.nonfinite_steps += 1
        self.nonfinite_total += 1
        self.log("train/nonfinite_total", float(self.nonfinite_total))
        if self.nonfinite_steps >= self.hparams.max_nonfinite_steps:
            raise RuntimeError(
                f"{self.nonfinite_steps} consecutive non-finite losses at step {self.global_step}: stopping "
                "(lower the learning rate, check the data, or use fp32)"
            )
        return None

    # ------------------------------------------------------------------ steps
    # An objective whose steps are "compute (loss, metrics), log them" only implements _loss;
    # SFT, which also generates on held-out data, overrides the steps.
    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _step(self, batch: dict, stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute and log the loss and a loss function's metrics under ``stage/``."""
        loss, metrics = self._loss(batch)
        bs = len(batch["rows"])
        train = stage == "train"
        for key, value in {"loss": loss, **metrics}.items():
            self.log(
                f"{stage}/{key}",
                value,
                on_step=train,
                on_epoch=not train,
                batch_size=bs,
                sync_dist=not train,
                prog_bar=key in ("loss", "rewards/accuracies", "accuracy"),
            )
        return loss, metrics

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        return self.guard(self._step(batch, "train")[0])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """The default AdamW's parameter groups: no decay on biases and norm weights (1-D tensors), as
        HF Trainer and TRL do. An objective with several parts may give a part its own ``lr``."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        h = self.hparams
        if self.optimizer_factory is not None:
            opt = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        else:
            opt = torch.optim.AdamW(self.param_groups(), lr=h.lr)
        if self.scheduler_factory is not None:
            sched = self.scheduler_factory(opt)
        else:
            total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(h.schedule, h.warmup_steps, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def grad_norm(self) -> torch.Tensor:
        """The total 2-norm of the gradients (one fused norm; under FSDP2 over every shard)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Lightning clips after this hook: train/grad_norm is the norm before clipping. The online loop
        # clips by hand before its step, so it logs its own (objectives/online/loop.py).
        if self.automatic_optimization:
            self.log("train/grad_norm", self.grad_norm(), on_step=True, batch_size=1)

    # ------------------------------------------------------------------ checkpoints
    def on_train_start(self) -> None:
        # Resuming mid-epoch, Lightning warns that the loader "is not resumable" (it has no state_dict), but
        # our sampler is: it skips the rows the interrupted epoch used (the datamodule checkpoints them).
        if isinstance(getattr(self.trainer.train_dataloader, "sampler", None), ResumableSampler):
            warnings.filterwarnings("ignore", _NOT_RESUMABLE, PossibleUserWarning)
            self._silenced = warnings.filters[0]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if getattr(self, "_silenced", None) in warnings.filters:  # said (or not) at the resumed epoch's start
            warnings.filters.remove(self._silenced)  # type: ignore[attr-defined]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = set(self.trainable_named_parameters())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["nonfinite_total"] = self.nonfinite_total
        checkpoint["objective"] = class_path(type(self))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved, mine = saved_objective(checkpoint), class_path(type(self))
        if saved not in (None, mine):  # another objective's state would fail later, far from the cause
            where = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
            raise ValueError(f"{where} was saved by the objective {saved}, not by {mine}")
        self.configure_model()
        if "state_dict" not in checkpoint:
            # A distributed (FSDP2) checkpoint is loaded in place by the strategy, non-strictly: missing
            # trainable weights are not detected there.
            return
        missing = set(self.trainable_named_parameters()) - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable weights, e.g. {sorted(missing)[:3]}")
        self.nonfinite_total = checkpoint.get("nonfinite_total", 0)


def class_path(cls: type | str) -> str:
    """``module.Class`` where the class is defined, also for a re-exported path (``lightning_vlm.objectives.DPO``)."""
    if isinstance(cls, str):
        module, _, name = cls.rpartition(".")
        try:
            return class_path(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError, ValueError):
            return cls
    return f"{cls.__module__}.{cls.__qualname__}"


def saved_objective(checkpoint: dict[str, Any]) -> str | None:
    """The objective class that saved ``checkpoint``: recorded by ours, in ``hyper_parameters`` by the command."""
    saved = checkpoint.get("objective") or checkpoint.get("hyper_parameters", {}).get("_class_path")
    return class_path(saved) if saved else None


def _schedule(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor
