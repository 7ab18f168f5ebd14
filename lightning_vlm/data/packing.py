"""Token-budget micro-batches for padding-free packed SFT (``data.packing``, docs/data.md).

The order is the :class:`ResumableSampler`'s (one seeded permutation per epoch); it is cut, in that order,
into micro-batches of at most ``max_tokens`` tokens (image tokens counted). Micro-batch k goes to rank
``k % world``; the list is padded with its first micro-batches so every rank gets the same count.
"""

from __future__ import annotations

import torch

from lightning_vlm.data.loaders import ResumableSampler
from lightning_vlm.data.rows import BadRowError


class TokenBudgetSampler(ResumableSampler):
    """Yields lists of row indices (a batch sampler). Being a ``DistributedSampler`` too, Lightning leaves
    it as is under DDP/FSDP. :meth:`resume_at` counts micro-batches (all ranks), not rows."""

    def __init__(self, lengths: list[int], rows: list[int], max_tokens: int, seed: int, source: str = "train",
                 num_replicas: int = 1, rank: int = 0):  # fmt: skip
        super().__init__(len(lengths), seed, num_replicas, rank)
        for row, n in zip(rows, lengths, strict=True):
            if n > max_tokens:  # unreachable with max_length <= max_tokens, which the datamodule requires
                raise BadRowError(f"{source}: row {row}: {n} tokens > data.max_tokens {max_tokens}")
        self.lengths, self.max_tokens = lengths, max_tokens

    def micro_batches(self) -> list[list[int]]:
        """This epoch's micro-batches of every rank, in order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()  # the ResumableSampler's order
        batches: list[list[int]] = [[]]
        tokens = 0
        for i in order:
            if batches[-1] and tokens + self.lengths[i] > self.max_tokens:
                batches.append([])
                tokens = 0
            batches[-1].append(i)
            tokens += self.lengths[i]
        pad = -len(batches) % self.num_replicas
        return batches + (batches * pad)[:pad]

    def __iter__(self):
        batches = self.micro_batches()
        if self.epoch == self._skip_epoch:
            batches = batches[self._skip_rows :]  # micro-batches here, a multiple of the world size
            self._skip_epoch = -1
        return iter(batches[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return len(self.micro_batches()) // self.num_replicas
