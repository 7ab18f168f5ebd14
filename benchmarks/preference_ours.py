"""lightning-vlm's side of benchmarks/grpo.py's DPO and MPO (against TRL's DPOTrainer,
benchmarks/preference_trl.py): our DPO or MPO trained through Lightning on the same pairs, timed per step.

The batch is collated by our PreferenceDataModule in the training process (``num_workers=0``, as TRL's
side), each prompt's image processed once per pair (``vision_once``, the default); the reference is a
frozen copy of the initial model, called in every step (no precomputed reference log-probs).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from grpo_common import BETA, MPO_WEIGHTS, bench_trainer


def run_ours_preference(
    model_dir: str,
    pairs: list[dict],
    steps: int,
    objective: str = "dpo",
    pairs_per_step: int = 4,
    lr: float = 1e-5,
    seed: int = 0,
    vision: str = "train",
    device: str = "cpu",
    stats: dict | None = None,
    objective_kwargs: dict | None = None,
) -> list[float]:
    """Train our DPO or MPO (``objective``, built with ``objective_kwargs`` on top of the comparison's
    settings) for ``steps`` optimiser steps and return each step's wall time (seconds), measured as on
    TRL's side: from the end of the previous step (the first: the start of the epoch), so the batch's
    fetch and collation are in, to the end of its optimiser step."""
    import lightning as L
    import torch

    from lightning_vlm.data import PreferenceDataModule
    from lightning_vlm.model.backbone import BackboneConfig
    from lightning_vlm.objectives import DPO, MPO

    stats = stats if stats is not None else {}
    work = Path(tempfile.mkdtemp(prefix="pref-bench-ours-"))
    (work / "images").mkdir()
    with (work / "pairs.jsonl").open("w") as f:
        for i, p in enumerate(pairs[: pairs_per_step * steps]):
            path = work / "images" / f"{i}.png"
            p["image"].save(path)
            user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p["question"]}]}
            f.write(json.dumps({"images": [str(path)], "prompt": [user], "chosen": p["chosen"],
                                "rejected": p["rejected"]}) + "\n")  # fmt: skip
    backbone = BackboneConfig(model_name_or_path=model_dir, vision=vision)
    kwargs = dict(lr=lr, beta=BETA, **(objective_kwargs or {}))
    if objective == "mpo":
        w = dict(zip(("preference_weight", "quality_weight", "generation_weight"), MPO_WEIGHTS, strict=True))
        module = MPO(backbone, **w, **kwargs)
    else:
        module = DPO(backbone, **kwargs)
    data = PreferenceDataModule(
        train=str(work / "pairs.jsonl"),
        batch_size=pairs_per_step,
        num_workers=0,
        check_images=False,
        seed=seed,
    )
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            stats.setdefault("completion_tokens", []).extend(batch["labels_mask"].sum(1).tolist())
            stats.setdefault("sequence_tokens", []).append(list(batch["input_ids"].shape))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            times.append(t - self.t0)
            stats.setdefault("cpu_times_s", []).append(c - self.c0)
            self.t0, self.c0 = t, c

    vision_calls = {"calls": 0, "patches": 0}

    class CountVision(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            def hook(module, args, kwargs):
                vision_calls["calls"] += 1
                pixels = kwargs.get("hidden_states", args[0] if args else None)
                vision_calls["patches"] += int(pixels.shape[0]) if pixels is not None else 0

            backbone = pl_module.backbone  # the policy's tower and the (hidden) reference copy's
            for model in (backbone.model, backbone._reference):
                if model is not None:
                    backbone._vision_of(model).register_forward_pre_hook(hook, with_kwargs=True)

    trainer = bench_trainer(steps, seed, device, [Timer(), CountVision()])
    trainer.fit(module, data)
    stats.update(
        vision_calls=vision_calls["calls"], vision_patches=vision_calls["patches"],
        trainable_params=sum(p.numel() for p in module.parameters() if p.requires_grad),
        torch_threads=torch.get_num_threads(),
    )  # fmt: skip
    shutil.rmtree(work)
    return times
