"""The :class:`RolloutCallback`: the rollout side of online RL.

One callback serves every online objective. Before each training step it takes the step's prompt batch
(``PromptDataModule``), encodes each prompt's images once, has its engine (Hugging Face generation by
default, or vLLM) sample G completions per prompt, scores them with the reward functions, and hands the
finished rollouts to the objective through its one hook, ``on_rollout(rollouts, stage)``. Held-out
batches get a greedy rollout the same way (``stage`` ``val``, ``test`` or ``predict``). The callback
samples and scores, nothing else: advantages and log-probs are the objective's business.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler

from lightning_vlm.model.vision import has_images
from lightning_vlm.rollout import engines
from lightning_vlm.rollout.engines import GenerationRequest, HFEngine, RolloutEngine, SamplingSettings
from lightning_vlm.rollout.rewards import RewardFn, accuracy, combine
from lightning_vlm.rollout.rollout import Rollout, completion_mask
from lightning_vlm.rollout.tables import write_samples


class RolloutCallback(L.Callback):
    """Sample, score and hand over a rollout before every training step and every held-out batch."""

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
        conversational_completions: bool = False,
        engine: RolloutEngine | None = None,
        eval_max_new_tokens: int | None = None,
        eval_sampling: bool = False,
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
            temperature: Sampling temperature; every log-prob over the rollout is taken at it.
            top_p: Nucleus sampling threshold (1.0: off).
            top_k: Sample among the k most likely tokens (0: off).
            rewards: Reward functions ``f(prompts, completions, **columns) -> list[float | None]`` (or
                TRL's ``f(completions, **kwargs)``), by import path (``lightning_vlm.rollout.rewards.accuracy``)
                or as a callable class with ``class_path``/``init_args``. Default: accuracy.
            reward_weights: One weight per reward function (default 1.0 each).
            conversational_completions: Give reward functions each completion as TRL does for chat data,
                ``[{"role": "assistant", "content": text}]``, not its text (the built-in rewards read both).
            engine: What generates: ``{class_path: lightning_vlm.rollout.HFEngine}`` (the default:
                Hugging Face generation on the trainer's model, prompt once and vision once), or
                ``lightning_vlm.rollout.VLLMEngine`` (vLLM, synced after every rollout's updates).
            eval_max_new_tokens: Tokens generated per held-out prompt (greedy); default: ``max_new_tokens``.
            eval_sampling: Held-out prompts also get ``num_generations`` samples each, seeded by the
                batch index so every check sees the same draw (logged as ``val/score`` and ``val/kl``).
            per_prompt_seeds: Seed each sample from (seed, rollout, refill draw, dataset row, sample
                index) instead of one generator per rank: a prompt's samples then do not depend on
                which rank or batch draws it (one RNG call per sample and token; the DDP equivalence tests).
            dynamic_sampling: DAPO's dynamic sampling: groups whose rewards are all equal (no learning
                signal) are dropped and more prompts are sampled until the batch holds as many
                informative groups as prompts (or ``max_refills`` extra batches were drawn).
            max_refills: Extra prompt batches dynamic sampling may draw per step.
            table_every_n_steps: Log a table of sample completions beside their images every N
                rollouts (a W&B table with the WandbLogger, and ``samples.jsonl`` in the run folder); 0: off.
            table_rows: Completions per table.
            seed: Seed of the sampling; each rollout's generation is seeded from it, the rollout's
                index and the rank, so a resumed run samples what the uninterrupted one would have.
        """
        super().__init__()
        if num_generations < 1:
            raise ValueError(f"rollout.num_generations must be at least 1, got {num_generations}")
        self.G = num_generations
        self.sampling = SamplingSettings(max_new_tokens, min_new_tokens, temperature, top_p, top_k)
        self.eval_sampling_settings = SamplingSettings(eval_max_new_tokens or max_new_tokens, do_sample=False)
        self.eval_sampling = eval_sampling
        self.engine = engine if engine is not None else HFEngine()
        self._bound = None
        self.rewards: list[RewardFn] = list(rewards) if rewards else [accuracy]
        self.reward_weights = reward_weights
        self.conversational = conversational_completions
        if reward_weights is not None and len(reward_weights) != len(self.rewards):
            raise ValueError(
                f"rollout: {len(self.rewards)} reward functions but {len(reward_weights)} reward_weights"
            )
        self.per_prompt_seeds, self.dynamic_sampling = per_prompt_seeds, dynamic_sampling
        self.max_refills, self.table_rows = max_refills, table_rows
        self.table_every_n_steps, self.rollouts, self.seed = table_every_n_steps, 0, seed

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "on_rollout", None)):
            raise TypeError(
                f"RolloutCallback: {type(pl_module).__name__} is not an online objective (it has no "
                "on_rollout hook; GRPO, GSPO, RLOO and PPO do)"
            )

    def on_train_batch_start(self, trainer, pl_module, batch: dict, batch_idx: int) -> None:
        rollouts = [self.sample(pl_module, batch)]
        if self.dynamic_sampling:
            rollouts = self._fill(trainer, pl_module, rollouts)
        self._log(pl_module, rollouts, len(batch["rows"]))
        pl_module.on_rollout(rollouts, "train")
        if self.table_every_n_steps and self.rollouts % self.table_every_n_steps == 0:
            folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank calls it
            if trainer.is_global_zero:
                write_samples(trainer, folder, rollouts[0], batch, self.table_rows)
        self.rollouts += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.engine.samples_from_trainer:
            start = time.perf_counter()
            self.engine.sync_weights(pl_module.backbone)
            pl_module.log("rollout/weight_sync_s", time.perf_counter() - start, on_step=True, batch_size=1)

    def _held_out(self, pl_module, batch: dict, batch_idx: int, stage: str) -> None:
        rollouts = [self.sample(pl_module, batch, sampling=self.eval_sampling_settings)]
        if self.eval_sampling:
            rollouts.append(self.sample(pl_module, batch, seed=self.seed * 1_000_003 + batch_idx))
        pl_module.on_rollout(rollouts, stage)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._held_out(pl_module, batch, batch_idx, "val")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._held_out(pl_module, batch, batch_idx, "test")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._held_out(pl_module, batch, batch_idx, "predict")

    def state_dict(self) -> dict[str, Any]:
        return {"rollouts": self.rollouts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts = state.get("rollouts", 0)

    # ------------------------------------------------------------------ sampling and scoring
    def _seed(self, rank: int, draw: int) -> int:
        """The seed of one generation: a function of (seed, rollout, rank, draw), so a resumed run
        samples exactly what the uninterrupted one would have, whatever else used the global RNG."""
        return engines.stable_seed(f"{self.seed}-{self.rollouts}-{rank}-{draw}")

    @torch.no_grad()
    def sample(
        self,
        pl_module,
        batch: dict,
        draw: int = 0,
        seed: int | None = None,
        sampling: SamplingSettings | None = None,
    ) -> Rollout:
        """Sample, mask and score the completions of every prompt in ``batch``: G samples each, or one
        greedy answer when ``sampling.do_sample`` is False. ``seed``: sample with this seed instead of
        the rollout's (held-out sampling that is the same at every check)."""
        bb = pl_module.backbone
        if self._bound is not bb:  # the engine binds once per backbone, also outside a Trainer
            self.engine.setup(bb)
            self._bound = bb
        sampling = sampling or self.sampling
        G = self.G if sampling.do_sample else 1
        ids, mask, vision = batch["input_ids"], batch["attention_mask"], batch["vision"]
        features = None
        if sampling.do_sample and has_images(vision):  # once per step (Rollout.features says who reuses it)
            features = bb.encode_images(vision)
        row_seeds = None
        if self.per_prompt_seeds and sampling.do_sample:
            key = f"{self.seed}-{self.rollouts}-{draw}" if seed is None else f"held-out-{seed}"
            row_seeds = [engines.stable_seed(f"{key}-{row}-{k}") for row in batch["rows"] for k in range(G)]
        if sampling.do_sample:
            seed = self._seed(pl_module.global_rank, draw) if seed is None else seed
        images, rows = batch.get("images"), list(batch["rows"])  # raw images: for engines that process them
        request = GenerationRequest(ids, mask, vision, G, sampling, features, seed, row_seeds, images, rows)
        out = self.engine.generate(request)
        completions = out.completion_ids
        cmask, truncated = completion_mask(completions, bb.tokenizer.eos_token_id)
        texts = bb.decode(completions)
        totals, per_fn = self.score(batch, completions * cmask, cmask, texts, G)
        device = ids.device
        return Rollout(
            prompt_ids=ids,
            prompt_mask=mask,
            vision=vision,
            features=features,
            completion_ids=completions,
            completion_mask=cmask,
            group_size=G,
            rewards=torch.tensor(totals, dtype=torch.float32, device=device),
            rewards_per_function={
                k: torch.tensor([math.nan if v is None else float(v) for v in vals], device=device)
                for k, vals in per_fn.items()
            },
            texts=texts,
            truncated=truncated,
            keep=torch.ones(len(texts), dtype=torch.bool, device=device),
            sampling=sampling,
            index=self.rollouts,
            rows=list(batch["rows"]),
            dynamic_sampling=self.dynamic_sampling,
            engine_logps=out.logps,
        )

    def score(self, batch: dict, completion_ids, cmask, texts: list[str], G: int) -> tuple[list[float], dict]:
        """Run the reward functions. Each gets the rows' own prompts (without ``data.system_prompt``, as a
        reward model was trained), the completions and, as keywords, every dataset column, the
        completions' token ids (``completion_ids``) and each sample's prompt index (``group``)."""
        prompts = [p for p in batch["row_prompts"] for _ in range(G)]
        columns: dict[str, Sequence[Any]] = {
            k: [v for v in values for _ in range(G)] for k, values in batch["columns"].items()
        }
        columns["completion_ids"] = [r[m.bool()].tolist() for r, m in zip(completion_ids, cmask, strict=True)]
        columns["group"] = [i for i in range(len(batch["prompts"])) for _ in range(G)]
        return combine(self.rewards, self.reward_weights, prompts, texts, columns, self.conversational)

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
            rollouts.append(self.sample(pl_module, extra, draw=refills + 1))
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
            "rollout/tokens": lengths.sum(),
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


def _spread(rollout: Rollout) -> torch.Tensor:
    """(B,) bool: the group's rewards are not all equal."""
    r = rollout.rewards.view(-1, rollout.group_size)
    return (r.max(1).values - r.min(1).values) > 1e-6
