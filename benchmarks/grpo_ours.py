"""lightning-vlm's side of benchmarks/grpo.py's GRPO and GSPO (against TRL's GRPOTrainer,
benchmarks/grpo_trl.py): our GRPO or GSPO trained through Lightning with the RolloutCallback on the same
folder, prompts and settings, timed per step.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from grpo_common import EPSILONS, bench_trainer, our_length_reward


def run_ours(
    model_dir: str,
    rows: list[dict],
    steps: int,
    num_generations: int = 8,
    prompts_per_step: int = 2,
    max_completion_length: int = 16,
    importance_sampling_level: str = "token",
    lr: float = 1e-5,
    seed: int = 0,
    out_dir: str | None = None,
    vision: str = "frozen",
    device: str = "cpu",
    stats: dict | None = None,
    gradient_checkpointing: bool = False,
    objective_kwargs: dict | None = None,
) -> list[float]:
    """Train lightning-vlm's GRPO (``token``) or GSPO (``sequence``) for ``steps`` optimiser steps on the
    same folder, rows and settings as ``run_trl`` and return each step's wall time (seconds): from the
    start of the batch (before the rollout) to the end of its optimiser step. ``objective_kwargs`` go to
    the objective on top of the comparison's settings; its ``loop`` entry to OnlineSettings."""
    import lightning as L
    import torch

    from lightning_vlm.data.prompt import PromptDataModule
    from lightning_vlm.model.backbone import BackboneConfig
    from lightning_vlm.objectives import GRPO, GSPO
    from lightning_vlm.objectives.online import OnlineSettings
    from lightning_vlm.rollout import RolloutCallback

    stats = stats if stats is not None else {}
    work = Path(out_dir or tempfile.mkdtemp(prefix="grpo-bench-ours-"))
    (work / "images").mkdir(parents=True, exist_ok=True)
    with (work / "prompts.jsonl").open("w") as f:
        for i, row in enumerate(rows):
            path = work / "images" / f"{i}.png"
            row["image"].save(path)
            user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}
            f.write(json.dumps({"images": [str(path)], "prompt": [user], "answer": row["answer"]}) + "\n")
    low, high = EPSILONS[importance_sampling_level]
    backbone = BackboneConfig(
        model_name_or_path=model_dir, vision=vision, gradient_checkpointing=gradient_checkpointing
    )
    kwargs = dict(objective_kwargs or {})
    loop = OnlineSettings(max_grad_norm=None, **kwargs.pop("loop", {}))
    common = dict(lr=lr, eps_low=low, eps_high=high, beta=0.0, loop=loop, **kwargs)
    if importance_sampling_level == "sequence":
        module = GSPO(backbone, **common)
    else:
        module = GRPO(backbone, norm="dapo", **common)
    data = PromptDataModule(
        train=str(work / "prompts.jsonl"), batch_size=prompts_per_step, check_images=False
    )
    times: list[float] = []
    lengths: list[int] = []

    class Timer(L.Callback):
        def setup(self, trainer, pl_module, stage):
            hand_over = pl_module.on_rollout

            def on_rollout(rollouts, stage):  # each step's completion lengths, as the objective gets them
                if stage == "train":
                    lengths.extend(rollouts[0].completion_mask.sum(1).tolist())
                hand_over(rollouts, stage)

            pl_module.on_rollout = on_rollout

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            stats.setdefault("cpu_times_s", []).append(time.process_time() - self.cpu0)

    rollout = RolloutCallback(
        num_generations=num_generations,
        max_new_tokens=max_completion_length,
        min_new_tokens=max_completion_length,
        rewards=[our_length_reward],
        table_every_n_steps=0,
        seed=seed,
    )
    vision_calls = {"calls": 0, "patches": 0}

    class CountVision(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            def hook(module, args, kwargs):
                vision_calls["calls"] += 1
                pixels = kwargs.get("hidden_states", args[0] if args else None)
                vision_calls["patches"] += int(pixels.shape[0]) if pixels is not None else 0

            pl_module.backbone.vision_tower.register_forward_pre_hook(hook, with_kwargs=True)

    # the timer first: the rollout is inside the step
    trainer = bench_trainer(steps, seed, device, [Timer(), rollout, CountVision()])
    trainer.fit(module, data)
    stats["completion_lengths"] = lengths
    stats["vision_calls"] = vision_calls["calls"]
    stats["vision_patches"] = vision_calls["patches"]
    if out_dir is None:
        shutil.rmtree(work)
    return times
