"""RolloutCallback: sample G completions per prompt, score them, and hand the objective a Rollout.

One callback serves every online objective (GRPO, GSPO, PPO). Before each training step it takes
the step's prompt batch (``PromptDataModule``), encodes each prompt's images once, samples the G
completions of every prompt from one prefill (``lightning_vlm.generation``), scores them with the
reward functions (``lightning_vlm.rewards``), and attaches a :class:`Rollout` to the batch as
``batch["rollout"]``. It asks the objective for what only the objective knows: the advantages,
and whether old-policy or reference log-probs are needed (neither is computed when not).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler

from lightning_vlm.rewards import RewardFn, accuracy, combine
from lightning_vlm.samples import write_samples
from lightning_vlm.vision import has_images


@dataclass
class Rollout:
    """One prompt batch and its sampled completions. Sample k of prompt i is row ``i * G + k``.

    ``features`` holds the prompts' image features when the image side is frozen: every forward
    over the rollout (old, reference and training log-probs) reuses them instead of re-encoding.
    ``keep`` is False for samples whose group dynamic sampling dropped; they carry no loss.
    """

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    vision: dict[str, Any]
    features: dict[str, Any] | None
    completion_ids: torch.Tensor  # (B*G, N)
    completion_mask: torch.Tensor  # (B*G, N) 1 up to and including EOS
    group_size: int
    rewards: torch.Tensor  # (B*G,)
    rewards_per_function: dict[str, torch.Tensor]  # (B*G,) each, NaN where not applicable
    texts: list[str]
    truncated: torch.Tensor  # (B*G,) bool: reached max_new_tokens without EOS
    max_new_tokens: int
    keep: torch.Tensor  # (B*G,) bool
    temperature: float = 1.0  # of the sampling: every log-prob over the rollout uses it
    policy_frozen: bool = False  # the policy's forwards run without gradient (PPO's critic warm-up)
    advantages: torch.Tensor | None = None  # (B*G,) per sample, or (B*G, N) per token (PPO)
    old_logps: torch.Tensor | None = None  # (B*G, N)
    ref_logps: torch.Tensor | None = None  # (B*G, N)
    extra: dict[str, Any] = field(default_factory=dict)  # objective-specific (PPO values, ...)

    @property
    def num_prompts(self) -> int:
        return self.prompt_ids.shape[0]

    def rows_of(self, samples: Sequence[int]) -> torch.Tensor:
        """Rollout rows of sample indices ``samples`` of every prompt, in block order (all prompts'
        sample ``samples[0]``, then ``samples[1]``, ...), which lets the forward share image features."""
        B, G = self.num_prompts, self.group_size
        return torch.tensor([i * G + k for k in samples for i in range(B)], device=self.prompt_ids.device)

    def sequences(self, samples: Sequence[int]) -> dict[str, Any]:
        """Model inputs for ``samples`` (see :meth:`rows_of`): prompt + completion, the completion
        positions to score, and ``copies`` for the vision-once forward."""
        rows, copies = self.rows_of(samples), len(samples)
        prompts = torch.arange(self.num_prompts, device=rows.device).repeat(copies)  # (copies*B,)
        P, N = self.prompt_ids.shape[1], self.completion_ids.shape[1]
        ids = torch.cat([self.prompt_ids[prompts], self.completion_ids[rows]], dim=1)  # (copies*B, P+N)
        mask = torch.cat([self.prompt_mask[prompts], self.completion_mask[rows]], dim=1)
        target = torch.zeros_like(mask)
        target[:, P:] = self.completion_mask[rows]
        vision = {}
        for (
            key,
            value,
        ) in self.vision.items():  # per-sequence entries (mm_token_type_ids) get the completion's zeros
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(self.prompt_ids.shape):
                value = torch.cat([value[prompts], value.new_zeros(len(rows), N)], dim=1)
            vision[key] = value
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "target_mask": target,
            "vision": vision,
            "copies": copies,
            "rows": rows,
            "prompt_length": P,
        }


def completion_mask(ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask up to and including the first EOS, truncated = no EOS) for (R, N) completion ids."""
    is_eos = ids == eos_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1]))
    mask = torch.arange(ids.shape[1], device=ids.device)[None, :] <= first[:, None]
    return mask.long(), ~is_eos.any(1)


class RolloutCallback(L.Callback):
    """Generate, score and hand over a rollout before every training step of an online objective."""

    def __init__(
        self,
        num_generations: int = 8,
        max_new_tokens: int = 256,
        min_new_tokens: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        rewards: list[Callable] | None = None,
        reward_weights: list[float] | None = None,
        per_prompt_seeds: bool = False,
        dynamic_sampling: bool = False,
        max_refills: int = 4,
        table_every_n_steps: int = 50,
        table_rows: int = 8,
        seed: int = 0,
    ):
        """
        Args:
            num_generations: G, completions sampled per prompt (a group).
            max_new_tokens: Longest completion; longer ones are cut (and counted as truncated).
            min_new_tokens: Hold EOS back until this many tokens (0: off; for benchmarks with equal lengths).
            temperature: Sampling temperature.
            top_p: Nucleus sampling threshold (1.0: off).
            top_k: Sample among the k most likely tokens (0: off).
            rewards: Reward functions ``f(prompts, completions, **columns) -> list[float | None]``, by
                import path (``lightning_vlm.rewards.accuracy``) or as a callable class with
                ``class_path``/``init_args`` (``lightning_vlm.rewards.OverlongPenalty``). Default: accuracy.
            reward_weights: One weight per reward function (default 1.0 each).
            per_prompt_seeds: Seed each sample from (seed, rollout, refill draw, dataset row, sample index) instead of
                one generator per rank: a prompt's samples then do not depend on which rank or batch
                draws it, so runs on different device counts sample the same completions (one RNG
                call per sample and token; used by the DDP equivalence tests).
            dynamic_sampling: DAPO's dynamic sampling: groups whose rewards are all equal (no learning
                signal) are dropped and more prompts are sampled until the batch holds as many
                informative groups as prompts (or ``max_refills`` extra batches were drawn).
            max_refills: Extra prompt batches dynamic sampling may draw per step.
            table_every_n_steps: Log a table of sample completions beside their images every N
                rollouts (a W&B table with the WandbLogger, and ``samples.jsonl`` in the run folder);
                0 turns it off.
            table_rows: Completions per table.
            seed: Seed of the sampling; each rollout's generation is seeded from it, the rollout's
                index and the rank, so a resumed run samples what the uninterrupted one would have.
        """
        super().__init__()
        if num_generations < 1:
            raise ValueError(f"rollout.num_generations must be at least 1, got {num_generations}")
        self.G = num_generations
        self.sampling = dict(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
        )
        self.rewards: list[RewardFn] = list(rewards) if rewards else [accuracy]
        self.reward_weights = reward_weights
        if reward_weights is not None and len(reward_weights) != len(self.rewards):
            raise ValueError(
                f"rollout: {len(self.rewards)} reward functions but {len(reward_weights)} reward_weights"
            )
        self.per_prompt_seeds = per_prompt_seeds
        self.dynamic_sampling = dynamic_sampling
        self.max_refills = max_refills
        self.table_every_n_steps = table_every_n_steps
        self.table_rows = table_rows
        self.rollouts = 0
        self.seed = seed

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "online"):
            raise TypeError(
                f"RolloutCallback: {type(pl_module).__name__} is not an online objective (GRPO, GSPO, PPO)"
            )
        pl_module.online.check_group_size(self.G)
        if self.dynamic_sampling and (self.G < 2 or pl_module.min_group_size < 2):
            raise ValueError(
                "rollout.dynamic_sampling drops groups of equal rewards, which carry no signal only for "
                f"group-relative advantages (GRPO, GSPO): it needs one of those and num_generations >= 2, "
                f"got {type(pl_module).__name__} with num_generations {self.G}"
            )

    def on_train_batch_start(self, trainer, pl_module, batch: dict, batch_idx: int) -> None:
        rollouts = [self.rollout(pl_module, batch)]
        if self.dynamic_sampling:
            rollouts = self._fill(trainer, pl_module, rollouts)
        online = pl_module.online
        needs = online.needs()
        for r in rollouts:
            if needs["old_logps"]:
                r.old_logps = online.logps(r)
            if needs["ref_logps"]:
                with pl_module.backbone.reference() as ref:
                    r.ref_logps = online.logps(r, model=ref)
            r.advantages = online.advantages(r)  # PPO's use the log-probs above
        batch["rollouts"] = rollouts
        self._log(pl_module, rollouts, len(batch["rows"]))
        if self.table_every_n_steps and self.rollouts % self.table_every_n_steps == 0:
            folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank calls it
            if trainer.is_global_zero:
                write_samples(trainer, folder, rollouts[0], batch, self.table_rows)
        self.rollouts += 1

    def state_dict(self) -> dict[str, Any]:
        return {"rollouts": self.rollouts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts = state.get("rollouts", 0)

    def _seed(self, rank: int, draw: int) -> int:
        """The seed of one generation: a function of (seed, rollout, rank, draw), so a resumed run
        samples exactly what the uninterrupted one would have, whatever else used the global RNG."""
        return _hash(f"{self.seed}-{self.rollouts}-{rank}-{draw}")

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, pl_module, batch: dict, draw: int = 0, seed: int | None = None) -> Rollout:
        """Sample, mask and score the G completions of every prompt in ``batch`` (``seed``: sample with
        this seed instead of the rollout's, e.g. for held-out sampling that is the same at every check)."""
        bb = pl_module.backbone
        ids, mask, vision = batch["input_ids"], batch["attention_mask"], batch["vision"]
        features = None
        if has_images(vision):  # once per step; reused by every forward when the image side is frozen
            features = bb.encode_images(vision)
        devices = [ids.device] if ids.device.type == "cuda" else []
        row_seeds = None
        if self.per_prompt_seeds:
            key = f"{self.seed}-{self.rollouts}-{draw}" if seed is None else f"held-out-{seed}"
            row_seeds = [_hash(f"{key}-{row}-{k}") for row in batch["rows"] for k in range(self.G)]
        with torch.random.fork_rng(devices=devices, device_type=ids.device.type):
            torch.manual_seed(self._seed(pl_module.global_rank, draw) if seed is None else seed)
            completions = bb.generate(
                ids,
                mask,
                vision,
                num_return_sequences=self.G,
                features=features,
                row_seeds=row_seeds,
                **self.sampling,
            )
        cmask, truncated = completion_mask(completions, bb.tokenizer.eos_token_id)
        texts = bb.decode(completions)
        totals, per_fn = self.score(batch, completions * cmask, cmask, texts)
        device = ids.device
        return Rollout(
            prompt_ids=ids,
            prompt_mask=mask,
            vision=vision,
            features=features if bb.vision_is_frozen else None,
            completion_ids=completions,
            completion_mask=cmask,
            group_size=self.G,
            rewards=torch.tensor(totals, dtype=torch.float32, device=device),
            rewards_per_function={
                k: torch.tensor([math.nan if v is None else float(v) for v in vals], device=device)
                for k, vals in per_fn.items()
            },
            texts=texts,
            truncated=truncated,
            max_new_tokens=self.sampling["max_new_tokens"],
            keep=torch.ones(len(texts), dtype=torch.bool, device=device),
            temperature=self.sampling["temperature"],
        )

    def score(self, batch: dict, completion_ids, cmask, texts: list[str]) -> tuple[list[float], dict]:
        """Run the reward functions. Each gets the prompts, the completions and, as keywords, every
        dataset column, the completions' token ids (``completion_ids``) and each sample's prompt index
        in the batch (``group``)."""
        G = self.G
        prompts = [p for p in batch["prompts"] for _ in range(G)]
        columns = {k: [v for v in values for _ in range(G)] for k, values in batch["columns"].items()}
        columns["completion_ids"] = [
            row[m.bool()].tolist() for row, m in zip(completion_ids, cmask, strict=True)
        ]
        columns["group"] = [i for i in range(len(batch["prompts"])) for _ in range(G)]
        return combine(self.rewards, self.reward_weights, prompts, texts, columns)

    def _fill(self, trainer, pl_module, rollouts: list[Rollout]) -> list[Rollout]:
        """Dynamic sampling: drop zero-spread groups; draw prompt batches until B groups remain."""
        B = rollouts[0].num_prompts
        informative = sum(int(_spread(r).sum()) for r in rollouts)
        refills, loader = 0, None
        # Every rank draws as many refills as the neediest one: the training loop then runs the same
        # number of forwards and collectives on every rank.
        while refills < self.max_refills and trainer.strategy.reduce_boolean_decision(
            informative < B, all=False
        ):
            loader = loader or iter(self._refills(trainer))
            extra = trainer.strategy.batch_to_device(next(loader))
            rollouts.append(self.rollout(pl_module, extra, draw=refills + 1))
            informative += int(_spread(rollouts[-1]).sum())
            refills += 1
        budget = B
        for r in rollouts:
            groups = _spread(r)
            for i in torch.nonzero(groups).flatten().tolist():
                groups[i] = budget > 0
                budget -= 1
            r.keep = groups.repeat_interleave(r.group_size)
        pl_module.log("rollout/refills", float(refills), on_step=True, batch_size=B)
        pl_module.log("rollout/kept_groups", float(min(B, informative)), on_step=True, batch_size=B)
        return rollouts

    def _refills(self, trainer) -> DataLoader:
        """Extra prompt batches for this step, in an order seeded like the sampling (resumable)."""
        loader = trainer.train_dataloader
        generator = torch.Generator().manual_seed(self._seed(trainer.global_rank, -1))
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=RandomSampler(loader.dataset, replacement=True, generator=generator),
            collate_fn=loader.collate_fn,
        )

    # ------------------------------------------------------------------ metrics and tables
    def _log(self, pl_module, rollouts: list[Rollout], batch_size: int) -> None:
        # Everything sampled this step (refills included), whether or not dynamic sampling kept it.
        r = torch.cat([x.rewards for x in rollouts])
        lengths = torch.cat([x.completion_mask.sum(1).float() for x in rollouts])
        values = {
            "rollout/reward": r.mean(),
            "rollout/reward_std": r.std() if r.numel() > 1 else r.new_zeros(()),
            "rollout/zero_std_groups": 1.0 - torch.cat([_spread(x) for x in rollouts]).float().mean(),
            "rollout/length/mean": lengths.mean(),
            "rollout/length/min": lengths.min(),
            "rollout/length/max": lengths.max(),
            "rollout/truncated": torch.cat([x.truncated for x in rollouts]).float().mean(),
        }
        for name in rollouts[0].rewards_per_function:
            vals = torch.cat([x.rewards_per_function[name] for x in rollouts])
            ok = vals[~vals.isnan()]
            values[f"rollout/rewards/{name}"] = ok.mean() if ok.numel() else vals.new_tensor(math.nan)
            values[f"rollout/rewards/{name}_std"] = ok.std() if ok.numel() > 1 else vals.new_zeros(())
        for key, value in values.items():
            pl_module.log(key, value, on_step=True, batch_size=batch_size, prog_bar=key == "rollout/reward")


def _hash(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


def _spread(rollout: Rollout) -> torch.Tensor:
    """(B,) bool: the group's rewards are not all equal."""
    r = rollout.rewards.view(-1, rollout.group_size)
    return (r.max(1).values - r.min(1).values) > 1e-6
