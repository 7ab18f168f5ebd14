"""Shared LightningDataModule machinery: sources, row checks, the processor hand-off, loaders."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_vlm.data.collate import image_token_counts
from lightning_vlm.data.loaders import (
    ResumableSampler,
    StreamBatches,
    StreamLoader,
    WorkerLoader,
    naming_source,
)
from lightning_vlm.data.packing import TokenBudgetSampler
from lightning_vlm.data.rows import BadRowError, as_list, check_rows, open_image
from lightning_vlm.data.sources import load_source, source_name

__all__ = ["ResumableSampler", "SyntheticData", "VLMDataModule", "WorkerLoader", "naming_source"]

log = logging.getLogger(__name__)


@dataclass
class SyntheticData:
    """Generate the bundled synthetic image-question data (shapes, colours, counts, positions).

    Args:
        out: Folder to write to (skipped when it already holds the same data).
        n_train: Rows per training split.
        n_val: Rows per held-out split.
        image_size: Side of the square images in pixels.
        seed: Seed of the generator.
    """

    out: str = "data/synthetic"
    n_train: int = 2000
    n_val: int = 200
    image_size: int = 112
    seed: int = 0


class VLMDataModule(L.LightningDataModule):
    """Base for the datamodules: subclasses give the required columns, a row check and collators."""

    required: tuple[str, ...] = ()
    alternatives: dict[str, tuple[str, ...]] = {}  # a required column -> the columns that may replace it
    streams = True  # whether a source may be streamed

    def __init__(
        self,
        train: str | dict | None = None,
        val: str | dict | None = None,
        test: str | dict | None = None,
        predict: str | dict | None = None,
        columns: dict[str, str] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_length: int = 2048,
        overlong: Literal["error", "drop"] = "error",
        bad_rows: Literal["error", "skip"] = "error",
        check_images: bool = True,
        synthetic: SyntheticData | None = None,
        seed: int = 0,
        worker_timeout: float = 600.0,
    ):
        """
        Args:
            train: Training data: a jsonl/json/parquet/arrow file, a glob of them, a folder (a
                ``save_to_disk`` one, or one of data files such as a hub snapshot), or a hub set, each
                optionally followed by ``[:config]:split[slice]`` (``user/set:cfg:train[:10%]``); or a
                dict of ``load_dataset`` arguments ``{path, name, data_dir, data_files, split,
                streaming}`` (docs/data.md).
            val: Held-out data in the same forms (optional).
            test: Data for ``lightning-vlm test``.
            predict: Data for ``lightning-vlm predict`` (defaults to ``val``).
            columns: Map our column names to the dataset's, e.g. ``{images: image}``.
            batch_size: Rows per training batch (per device).
            eval_batch_size: Rows per validation / prediction batch (defaults to ``batch_size``).
            num_workers: DataLoader workers; images are decoded and processed there. They start with
                ``spawn``: a worker forked from a process that already runs threads (W&B, tqdm,
                tokenizers, gloo) can deadlock holding one of their locks.
            max_length: Longest tokenised row (image tokens included).
            overlong: A row longer than ``max_length``: ``error``, or ``drop`` and count. Rows are
                never cut, so image tokens are never cut through.
            bad_rows: A malformed row (missing field, unreadable image, image count mismatch):
                ``error`` naming row and field, or ``skip`` and count.
            check_images: Decode every image once while checking rows (catches truncated files
                before training); when off only headers are read.
            synthetic: Write the bundled synthetic data first (offline quickstart and tests).
            seed: Seed of the training shuffle.
            worker_timeout: Seconds a worker may take to deliver a batch before the run stops with an
                error naming the rank (0 waits forever).
        """
        super().__init__()
        rules = {"batch_size": (batch_size, batch_size >= 1, ">= 1"), "num_workers": (num_workers, num_workers >= 0, ">= 0"),
                 "eval_batch_size": (eval_batch_size, eval_batch_size is None or eval_batch_size >= 1, ">= 1 or null"),
                 "max_length": (max_length, max_length >= 1, ">= 1")}  # fmt: skip
        for key, (value, ok, rule) in rules.items():
            if not ok:  # checked here, before the model loads
                raise ValueError(f"data.init_args.{key} must be {rule}, got {value}")
        self.save_hyperparameters()
        self.sources = {"train": train, "val": val, "test": test, "predict": predict or val}
        self.columns = dict(columns or {})
        self.synthetic = synthetic  # kept as given: hparams turns dataclasses into dicts
        self.processor = None  # taken from the model's backbone in setup(), or set by hand
        self.datasets: dict[str, Any] = {}
        self.skipped: dict[str, dict[str, int]] = {}
        self.lengths: dict[str, list[int]] = {}  # source -> its kept rows' token lengths, image tokens counted
        self._resume = (0, 0)  # (epoch, rows used) of a resumed fit; see state_dict
        self._raw_batches: dict[int, int] = {}

    def prepare_data(self) -> None:
        syn = self.synthetic
        if syn is not None:
            from lightning_vlm.data.synthetic import write_synthetic

            write_synthetic(syn.out, syn.n_train, syn.n_val, syn.image_size, syn.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.processor is None:
            if self.trainer is None or not hasattr(self.trainer.lightning_module, "backbone"):
                raise RuntimeError(
                    "the datamodule needs a processor: attach it to a trainer or set .processor"
                )
            self.processor = self.trainer.lightning_module.backbone.processor
        stages = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        wanted = stages.get(stage, ("train", "val"))
        for split in wanted:
            if split not in self.datasets and self.sources[split]:
                self.datasets[split] = self.load_split(self.sources[split])
        if stage == "fit" and "train" not in self.datasets:
            raise ValueError("data.train is required for fit")
        if stage in ("validate", "test", "predict") and wanted[0] not in self.datasets:  # its one split
            raise ValueError(f"data.{wanted[0]} is required for {stage}")

    def load_split(self, source: str | dict):
        h, name = self.hparams, source_name(source)
        ds = load_source(source, self.columns, self.required, self.alternatives)
        self.skipped[name] = {}
        if not hasattr(ds, "__len__"):  # streamed: rows are checked as they arrive (StreamBatches)
            if not self.streams:
                raise ValueError(f"{name}: {type(self).__name__} cannot stream its data; drop streaming")
            return ds
        # Large sources are checked in parallel, one process per DataLoader worker.
        procs = min(h.num_workers, os.cpu_count() or 1) if h.num_workers > 1 and len(ds) >= 2000 else None
        ds, counts, self.lengths[name] = check_rows(ds, name, self._checker(), self._policy(), procs,
                                                    self._check_cache(ds))
        if counts:
            log.warning("%s: skipped %s of %d rows", name, counts, len(ds) + sum(counts.values()))
        self.skipped[name] = counts
        if len(ds) == 0:
            raise ValueError(f"{name}: no usable rows left after checks ({counts})")
        return ds

    def _policy(self) -> tuple[str, str, int]:
        return self.hparams.bad_rows, self.hparams.overlong, self.hparams.max_length

    def _check_cache(self, ds) -> Path:
        """Where the check results of ``ds`` are kept: named by its fingerprint and all that the results
        depend on (the processor, the check's settings, the code of the checks); not the policy, which
        is applied to the results."""
        from datasets.fingerprint import Hasher

        code = [f.read_bytes() for f in sorted(Path(__file__).parent.glob("*.py"))]
        settings = (type(self).__qualname__, self.hparams.check_images, getattr(self, "system_prompt", None))
        proc, tok = self.processor, self.processor.tokenizer  # not pickled: a call changes its padding state
        what = [proc.to_json_string(), sorted(tok.get_vocab().items()), tok.chat_template, proc.chat_template]
        key = Hasher.hash([ds._fingerprint, what, settings, code])
        root = os.environ.get("LIGHTNING_VLM_CACHE", Path.home() / ".cache" / "lightning_vlm")
        return Path(root) / "row_checks" / f"{key}.parquet"

    def _checker(self):
        """The row check bound to a copy without the trainer (its model) and data, for worker processes."""
        light = copy.copy(self)
        light.trainer, light.datasets = None, {}
        return light._check_row

    def _check_row(self, row: dict) -> int:
        """Validate a row (raise BadRowError naming row and field) and return its token length."""
        raise NotImplementedError

    def images_of(self, row: dict, expected: int, field: str) -> list:
        """Open the row's images (decoded when ``check_images``) and check their count."""
        refs = as_list(row.get("images"))
        if len(refs) != expected:
            raise BadRowError(
                f"row {row['__row']}: field {field!r} has {expected} image placeholder(s) "
                f"but 'images' lists {len(refs)}"
            )
        return [open_image(r, row["__base"], row["__row"], decode=self.hparams.check_images) for r in refs]

    @staticmethod
    def check_replies(messages: list[dict], row: int, field: str) -> None:
        """Refuse an assistant reply with no text: it would train on its end-of-turn token alone."""
        for k, msg in enumerate(messages):
            content = msg["content"]
            text = content if isinstance(content, str) else "".join(p.get("text") or "" for p in content)
            if msg["role"] == "assistant" and not text.strip():
                raise BadRowError(f"row {row}: field {field!r}: message {k}, the assistant's reply, is empty")

    def token_length(self, text: str, images: list) -> int:
        """Tokens of ``text`` once each image placeholder is expanded (without processing pixels where the
        processor can count from image sizes)."""
        n = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not images:
            return n
        counts = image_token_counts(self.processor, images)
        if counts is not None:
            return n + sum(counts) - len(images)
        rgb = [im.convert("RGB") for im in images]
        return len(self.processor(text=[text], images=[rgb], add_special_tokens=False)["input_ids"][0])

    def _collator(self, split: str):
        """The collate function of ``split`` (``train``, ``val``, ``test``, ``predict``, or a split scanned
        by an objective)."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self._collator("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self._collator("val"), shuffle=False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self._collator("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self._collator("predict"), shuffle=False)

    def _loader(self, split: str, collate, shuffle: bool) -> DataLoader:
        h, name, (world, rank) = self.hparams, source_name(self.sources[split]), self._world()
        size = h.batch_size if split == "train" else (h.eval_batch_size or h.batch_size)
        workers = {"multiprocessing_context": "spawn", "timeout": h.worker_timeout} if h.num_workers else {}
        args: dict[str, Any] = {"num_workers": h.num_workers, "pin_memory": torch.cuda.is_available()}
        if not hasattr(self.datasets[split], "__len__"):  # streamed: this rank's share, no sampler
            from datasets.distributed import split_dataset_by_node

            skip = self._resume[1] // (size * world) if split == "train" else 0  # raw batches used
            batches = StreamBatches(self._checker(), collate, name, self._policy(), skip)
            ds = split_dataset_by_node(self.datasets[split], rank=rank, world_size=world)
            return StreamLoader(ds, batches, self.skipped[name], batch_size=size, **args, **workers)
        sampler = self._train_sampler(world, rank) if shuffle else None
        batched = isinstance(sampler, TokenBudgetSampler)  # it yields whole micro-batches
        args |= {"batch_sampler": sampler} if batched else {"sampler": sampler, "batch_size": size}
        loader = WorkerLoader(self.datasets[split], collate_fn=partial(naming_source, collate, name),
                              persistent_workers=h.num_workers > 0, **args, **workers)  # fmt: skip
        if batched:  # a DistributedSampler as the loader's sampler: Lightning neither re-shards nor wraps it
            object.__setattr__(loader, "sampler", sampler)
        return loader

    def _rows_per_batch(self) -> int:
        """What one training batch counts for in the resume state (SFT's packing counts micro-batches)."""
        return self.hparams.batch_size

    def _train_sampler(self, world: int, rank: int) -> ResumableSampler:
        sampler = ResumableSampler(len(self.datasets["train"]), self.hparams.seed, world, rank)
        sampler.resume_at(*self._resume)
        return sampler

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the epoch and how many of its training rows (all ranks) were used (see
        :meth:`_rows_per_batch`)."""
        state: dict[str, Any] = {"skipped": self.skipped}
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit":  # also when saved after validation
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            done = self._raw_batches.get(trainer.current_epoch, done)  # streamed: also those left empty
            rows = done * self._rows_per_batch() * trainer.world_size
            state["resume"] = {"epoch": trainer.current_epoch, "rows": rows}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        resume = state.get("resume") or {}
        self._resume = (resume.get("epoch", 0), resume.get("rows", 0))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Note how many raw batches of a streamed training split the step's batch completes."""
        if isinstance(batch, dict) and "raw_batch" in batch:
            index = batch.pop("raw_batch")
            if self.trainer is not None and self.trainer.training:
                self._raw_batches = {self.trainer.current_epoch: index + 1}
        return batch
