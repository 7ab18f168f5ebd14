"""The TRL side of benchmarks/grpo.py's DPO and MPO: TRL 1.16's DPOTrainer configured as the comparison
needs (``trl_preference_config``) and trained and timed per step (``run_trl_preference``).

MPO in TRL is DPOConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]); its
``bco_pair`` term has no reward shift (delta = 0: TRL dropped the running mean), ours uses the running
mean of past batch rewards (0 on the first step), the same work. TRL's vision collator
(DataCollatorForVisionPreference) gives the chosen and the rejected sequence each a copy of the image
and runs the processor inside the collator; its reference model is a second copy loaded from the same
folder (no PEFT, ``precompute_ref_log_probs`` off), called with the same batch.

Runs inside TRL's own environment, in the subprocess that ``benchmarks/grpo.py --variant trl:dpo`` (or
``trl:mpo``) starts. Only the standard library and benchmarks/grpo_common.py are imported at import time.
"""

from __future__ import annotations

import tempfile
import time

from grpo_common import BETA, MPO_WEIGHTS, trl_training_args


def trl_preference_config(out_dir: str, objective: str, steps: int, pairs_per_step: int, lr: float, seed: int,
                          device: str):  # fmt: skip
    """The DPOConfig of the comparison: one optimiser step = ``pairs_per_step`` pairs, no accumulation."""
    from trl import DPOConfig

    mpo = objective == "mpo"
    return DPOConfig(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=pairs_per_step,
        gradient_accumulation_steps=1,
        max_length=None,  # nothing truncated (the sequences are ~100 tokens anyway)
        # Objective: DPO sigmoid, or MPO's three terms with lightning-vlm's default weights and beta.
        loss_type=["sigmoid", "bco_pair", "sft"] if mpo else ["sigmoid"],
        loss_weights=list(MPO_WEIGHTS) if mpo else None,
        beta=BETA,
        precompute_ref_log_probs=False,  # the reference forward runs in every step, as ours
        **trl_training_args(lr, seed, device),
    )


def run_trl_preference(
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
) -> list[float]:
    """Train TRL's DPOTrainer (``objective`` ``dpo`` or ``mpo``) for ``steps`` optimiser steps on ``pairs``
    (``{"image", "question", "chosen", "rejected"}``) and return each step's wall time (seconds): from the
    end of the previous step (the first: the start of the epoch), so the batch's fetch and collation are
    in, to the end of its optimiser step."""
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForImageTextToText, TrainerCallback
    from trl import DPOTrainer

    from lightning_vlm.model.processing import load_processor

    stats = stats if stats is not None else {}
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(model_dir)
    processor = load_processor(model_dir, config)  # the stock Qwen2-VL processor needs torchvision
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    if vision == "frozen":
        (model.model.visual if hasattr(model.model, "visual") else model.visual).requires_grad_(False)
    n = pairs_per_step * steps
    if len(pairs) < n:
        raise ValueError(f"run_trl_preference needs {n} pairs (pairs_per_step * steps), got {len(pairs)}")
    # TRL's vision preference format: a conversational prompt (string content; TRL puts the image placeholder
    # in front of the first user turn's text), conversational chosen/rejected, an "images" column.
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": p["question"]}], "images": [p["image"]],
         "chosen": [{"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "assistant", "content": p["rejected"]}]}
        for p in pairs[:n]
    ])  # fmt: skip
    times: list[float] = []
    cpu_times: list[float] = []

    class StepTimer(TrainerCallback):
        # on_epoch_begin comes before the epoch's first batch is fetched; on_step_end after optimizer.step()
        # and zero_grad. Step k's window runs from step k-1's end: fetch, collation, forwards, backward, step.
        def on_epoch_begin(self, args, state, control, **kwargs):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            times.append(t - self.t0)
            cpu_times.append(c - self.c0)
            self.t0, self.c0 = t, c

    tmp = tempfile.TemporaryDirectory(prefix="trl-pref-bench-")
    args = trl_preference_config(tmp.name, objective, steps, pairs_per_step, lr, seed, device)
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor, callbacks=[StepTimer()]
    )
    vision_calls = {"calls": 0, "patches": 0}

    def count_vision(module, args, kwargs):
        vision_calls["calls"] += 1
        pixels = args[0] if args else kwargs.get("hidden_states", kwargs.get("pixel_values"))
        vision_calls["patches"] += int(pixels.shape[0])

    for m in (trainer.model, trainer.ref_model):
        (m.model.visual if hasattr(m.model, "visual") else m.visual).register_forward_pre_hook(
            count_vision, with_kwargs=True
        )
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        stats.setdefault("completion_tokens", []).extend(batch["completion_mask"].sum(1).tolist())
        stats.setdefault("sequence_tokens", []).append(list(batch["input_ids"].shape))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    stats.update(
        cpu_times_s=cpu_times, vision_calls=vision_calls["calls"], vision_patches=vision_calls["patches"],
        ref_model=trainer.ref_model is not None, torch_threads=torch.get_num_threads(),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        trl_config={k: getattr(args, k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "loss_type", "loss_weights", "beta",
            "precompute_ref_log_probs", "learning_rate", "optim", "lr_scheduler_type", "max_grad_norm", "bf16",
            "use_cpu", "gradient_checkpointing", "max_length", "padding_free")},
    )  # fmt: skip
    tmp.cleanup()
    return times
