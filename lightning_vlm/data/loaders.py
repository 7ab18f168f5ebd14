"""DataLoaders of the datamodules: the worker timeout that names its rank, the resumable shuffle, and the
loader of a streamed split (rows checked as they arrive, split by rank, resumed by passing over the
batches already used)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_vlm.data.rows import ROW, BadRowError, checked, judge

log = logging.getLogger(__name__)


class WorkerLoader(DataLoader):
    """A DataLoader whose worker timeout says which rank waited, and what to do about it."""

    def __iter__(self):
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError as err:
                if "timed out" not in str(err):
                    raise
                # End the stuck workers now: one exiting later would raise in whatever runs then.
                getattr(batches, "_shutdown_workers", lambda: None)()
                self._iterator = None
                rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
                raise RuntimeError(
                    f"rank {rank}: a DataLoader worker delivered no batch in {self.timeout:g} s "
                    "(data.worker_timeout): it is stuck or too slow. Raise data.worker_timeout, or set "
                    "data.num_workers: 0 to load in the training process"
                ) from err
            yield batch


def naming_source(collate, source: str, rows: list[dict]):
    """``collate(rows)``, its bad rows (an image that fails only when decoded) named with their source."""
    try:
        return collate(rows)
    except BadRowError as err:
        raise BadRowError(f"{source}: {err}") from err


class ResumableSampler(DistributedSampler):
    """A seeded permutation per epoch, split across ranks, that can skip the rows an interrupted epoch
    already used, so a resumed run sees the same batches as an uninterrupted one. Being a
    ``DistributedSampler``, Lightning uses it as is under DDP/FSDP instead of wrapping it. ``__len__``
    stays the full epoch: Lightning sizes epochs from it; a resumed epoch just ends early.
    """

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0):
        indices: Any = range(n)  # only its length is used
        super().__init__(indices, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.n = n
        self._skip_epoch, self._skip_rows = -1, 0

    def resume_at(self, epoch: int, rows: int) -> None:
        """Skip the first ``rows`` rows (all ranks together) of ``epoch``'s order, once."""
        self._skip_epoch, self._skip_rows = epoch, rows

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        order += order[: self.total_size - self.n]  # pad so every rank gets the same count
        if self.epoch == self._skip_epoch:
            order = order[self._skip_rows :]  # a whole number of global batches: ranks stay aligned
            self._skip_epoch = -1
        return iter(order[self.rank :: self.num_replicas])


class StreamBatches:
    """The collate function of a streamed split. Each row is checked as it arrives: bad and overlong rows
    are dropped and counted, or stop the run, per ``policy`` (``bad_rows``, ``overlong``, ``max_length``);
    the rest are collated. Raw batch ``i`` of an epoch is the ``seen``-th of worker ``i % workers`` (the
    loader takes batches from its workers in turn); the first ``skip`` (used before a resume) are passed
    over unchecked. Each batch carries ``skipped`` (its counts) and ``raw_batch`` (its index).
    """

    def __init__(self, check: Callable[[dict], int], collate, source: str, policy: tuple, skip: int = 0):
        self.check, self.collate, self.source, self.policy, self.skip = check, collate, source, policy, skip
        self.seen = 0

    def __call__(self, rows: list[dict]) -> dict:
        info = torch.utils.data.get_worker_info()
        index = self.seen * (info.num_workers if info else 1) + (info.id if info else 0)
        self.seen += 1
        counts: Counter[str] = Counter()
        keep = []
        for row in rows if index >= self.skip else []:
            reason = judge(*checked(self.check, row), row[ROW], self.source, *self.policy)
            if reason:
                counts[reason] += 1
            else:
                keep.append(row)
        batch = naming_source(self.collate, self.source, keep) if keep else {"rows": []}
        return {**batch, "skipped": dict(counts), "raw_batch": index}


class StreamLoader(WorkerLoader):
    """Batches of a streamed split (no sampler: the dataset is this rank's share). Skip counts are added
    to ``counts`` as batches arrive; a raw batch left without rows is not yielded."""

    def __init__(self, dataset, batches: StreamBatches, counts: dict[str, int], **kwargs):
        super().__init__(dataset, collate_fn=batches, **kwargs)
        self.batches, self.counts = batches, counts

    def __iter__(self):
        self.batches.seen = 0  # workers are not persistent: each epoch gets a fresh copy
        for batch in super().__iter__():
            for reason, n in batch.pop("skipped").items():
                self.counts[reason] = self.counts.get(reason, 0) + n
            if batch["rows"]:
                yield batch
        self.batches.skip = 0  # a resume passes over batches of its first epoch only
        if self.counts:
            log.warning("%s: skipped %s rows so far", self.batches.source, self.counts)
