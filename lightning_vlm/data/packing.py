"""Token-budget micro-batches for padding-free packed SFT (``data.packing``, docs/data.md).

The rows are cut ONCE, in the seed's order, into micro-batches of at most ``max_tokens`` tokens (image
tokens counted); each epoch shuffles only their order (seed + epoch): Lightning sizes every epoch by one
``len``, so a count varying per epoch cut off rows. Micro-batch k goes to rank ``k % world``; the list is
padded with its first micro-batches so every rank gets the same count.
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
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
        self.bins: list[list[int]] = [[]]  # the micro-batches, the same every epoch
        tokens = 0
        for i in order:
            if self.bins[-1] and tokens + lengths[i] > max_tokens:
                self.bins.append([])
                tokens = 0
            self.bins[-1].append(i)
            tokens += lengths[i]

    def micro_batches(self) -> list[list[int]]:
        """This epoch's micro-batches of every rank, in order: the bins in this epoch's order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = [self.bins[k] for k in torch.randperm(len(self.bins), generator=generator).tolist()]
        pad = -len(batches) % self.num_replicas
        return batches + (batches * pad)[:pad]

    def __iter__(self):
        batches = self.micro_batches()
        if self.epoch == self._skip_epoch:
            batches = batches[self._skip_rows :]  # micro-batches here, a multiple of the world size
            self._skip_epoch = -1
        return iter(batches[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return -(-len(self.bins) // self.num_replicas)  # every epoch the same
