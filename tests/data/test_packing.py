"""Token-budget micro-batches for packed SFT: budget, the shuffle order, ranks, resuming, the errors."""

from __future__ import annotations

import random

import pytest
from torch.utils.data import DataLoader

from lightning_vlm.data.loaders import ResumableSampler
from lightning_vlm.data.packing import TokenBudgetSampler
from lightning_vlm.data.rows import BadRowError
from lightning_vlm.data.sft import SFTDataModule
from tests.helpers.sft_data import datamodule

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(10, 40) for _ in range(50)]  # 4:1 (one generator: not 50 times the same length)


def sampler(world: int = 1, rank: int = 0, budget: int = 100, epoch: int = 1) -> TokenBudgetSampler:
    s = TokenBudgetSampler(LENGTHS, list(range(len(LENGTHS))), budget, seed=3, num_replicas=world, rank=rank)
    s.set_epoch(epoch)
    return s


def test_micro_batches_are_cut_once_and_only_their_order_changes_per_epoch():
    bins = sampler().bins
    order = ResumableSampler(len(LENGTHS), seed=3)  # its epoch 0: the seed alone
    assert [i for b in bins for i in b] == list(order)  # the unpacked sampler's order, cut
    sums = [sum(LENGTHS[i] for i in b) for b in bins]
    assert max(sums) <= 100
    assert all(s + LENGTHS[b[0]] > 100 for s, b in zip(sums, bins[1:], strict=False))  # full: the next row did not fit
    epochs = [list(sampler(epoch=e)) for e in range(4)]
    assert all(sorted(e) == sorted(bins) for e in epochs)  # the same micro-batches, every row once
    assert {len(sampler(epoch=e)) for e in range(4)} == {len(bins)}
    assert len({str(e) for e in epochs}) == 4  # each epoch another order


def test_a_lightning_fit_trains_every_row_once_in_every_epoch(tmp_path):
    """Lightning reads len(loader) once, before any set_epoch: an epoch longer than that lost its tail."""
    import lightning as L
    import torch

    seen: dict[int, list[int]] = {}

    class Rows(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, _):
            seen.setdefault(self.current_epoch, []).extend(batch)
            return self.w.sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    s = TokenBudgetSampler(LENGTHS, list(range(len(LENGTHS))), 60, seed=0)
    loader = DataLoader(range(len(LENGTHS)), batch_sampler=s, collate_fn=list)
    object.__setattr__(loader, "sampler", s)  # as the datamodule does: Lightning calls its set_epoch
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(Rows(), loader)
    assert {e: sorted(rows) for e, rows in seen.items()} == {e: list(range(len(LENGTHS))) for e in range(4)}
    assert len({str(rows) for rows in seen.values()}) == 4  # set_epoch took: each epoch another order


def test_two_ranks_get_disjoint_micro_batches_and_the_same_count():
    alone = sampler().micro_batches()
    whole = sampler(2, 0).micro_batches()  # padded with its first micro-batches to an even count
    pad = len(whole) - len(alone)
    assert len(whole) % 2 == 0 and whole == alone + alone[:pad]
    ranks = [list(sampler(2, r)) for r in (0, 1)]
    assert ranks == [whole[0::2], whole[1::2]] and len(ranks[0]) == len(sampler(2, 1))
    mine = [{i for b in r for i in b} for r in ranks]
    assert mine[0] | mine[1] == set(range(len(LENGTHS)))
    assert len(mine[0] & mine[1]) == sum(len(b) for b in alone[:pad])  # only the padding repeats


def test_a_resumed_epoch_skips_the_micro_batches_used():
    whole = sampler(2, 1).micro_batches()
    s = sampler(2, 1)
    s.resume_at(1, 4)  # 4 micro-batches (2 per rank) were used before the interruption
    assert list(s) == whole[4:][1::2]
    assert list(s) == whole[1::2]  # once: the next epoch pass is whole again


def test_a_row_over_the_budget_is_named_with_its_length():
    with pytest.raises(BadRowError, match=r"t.jsonl: row 7: 150 tokens > data.max_tokens 100"):
        TokenBudgetSampler([10] * 7 + [150], list(range(8)), 100, seed=0, source="t.jsonl")


@pytest.mark.parametrize("max_tokens", [None, 100])
def test_packing_needs_a_budget_that_holds_the_longest_row(max_tokens):
    with pytest.raises(ValueError, match=rf"max_tokens must be >= max_length \(256\) with packing, got {max_tokens}"):
        SFTDataModule(train="x.jsonl", packing=True, max_tokens=max_tokens, max_length=256)


def test_packing_refuses_a_streamed_split(processor, tmp_path, synthetic_dir):
    dm = SFTDataModule(train={"path": str(synthetic_dir / "sft_train.jsonl"), "streaming": True},
                       packing=True, max_tokens=2048)  # fmt: skip
    dm.processor = processor
    with pytest.raises(ValueError, match="SFTDataModule cannot stream its data; drop streaming"):
        dm.setup("fit")


def test_packed_loader_batches_rows_by_tokens_and_resumes(processor, synthetic_dir):
    dm = datamodule(processor, str(synthetic_dir / "sft_train.jsonl"), packing=True, max_tokens=256, max_length=256)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, TokenBudgetSampler)  # Lightning sees a DistributedSampler: no re-sharding
    batches = list(loader)
    lengths = dict(zip(dm.datasets["train"]["__row"], dm.lengths[str(synthetic_dir / "sft_train.jsonl")], strict=True))
    for batch in batches:
        assert batch["packed"] is True
        real = batch["attention_mask"].sum(1).tolist()
        assert real == [lengths[r] for r in batch["rows"]]  # the checked length is the collated one
        assert sum(real) <= 256
    assert sorted(r for b in batches for r in b["rows"]) == sorted(lengths)  # each row once
    assert len(batches) < len(lengths) / 2  # several rows per micro-batch
    dm.load_state_dict({"resume": {"epoch": 0, "rows": 2, "packed_max_tokens": 256}})  # micro-batches
    assert [b["rows"] for b in dm.train_dataloader()] == [b["rows"] for b in batches[2:]]
    assert dm._collator("val")([dm.datasets["train"][0]])["packed"] is False  # held-out batches stay padded


@pytest.mark.parametrize(("saved", "packing", "match"), [
    (None, True, "counts its data position in rows, this run in packed micro-batches of data.max_tokens 256"),
    (512, True, "in packed micro-batches of data.max_tokens 512, this run in packed micro-batches of data.max_tokens 256"),
    (256, False, "in packed micro-batches of data.max_tokens 256, this run in rows"),
])  # fmt: skip
def test_resuming_with_another_packing_setting_is_refused(saved, packing, match):
    dm = SFTDataModule(train="x.jsonl", packing=packing, max_tokens=256, max_length=256)
    with pytest.raises(ValueError, match=match):
        dm.load_state_dict({"resume": {"epoch": 0, "rows": 3, "packed_max_tokens": saved}})
    dm.load_state_dict({"resume": {"epoch": 0, "rows": 0, "packed_max_tokens": saved}})  # nothing used yet: fine
    same = {"resume": {"epoch": 1, "rows": 3, "packed_max_tokens": 256 if packing else None}}
    dm.load_state_dict(same)
    assert dm._resume == (1, 3)
