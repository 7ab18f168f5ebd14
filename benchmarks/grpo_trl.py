"""The TRL side of benchmarks/grpo.py: TRL 1.16's GRPOTrainer configured as the comparison needs
(``trl_config``), trained and timed per step (``run_trl``), and instrumented to count what it does per step
(``_instrument``).

Runs inside TRL's own environment (see benchmarks/requirements-trl.txt), in the subprocess that
``benchmarks/grpo.py --variant trl:<objective>`` starts. Only the standard library and
benchmarks/grpo_common.py are imported at import time; torch, transformers, datasets and trl are
imported inside the functions, so the module imports without TRL installed.
"""

from __future__ import annotations

import tempfile
import time

from grpo_common import EPSILONS, length_reward, trl_training_args

# GRPO: DAPO normalisation (TRL's default: token sum / token count). GSPO: TRL's documented GSPO recipe,
# loss_type "grpo" = mean over sequences of the sequence loss, which is lightning_vlm.losses.gspo_loss.
# With every completion exactly max_completion_length long the two normalisations coincide anyway.
LOSS_TYPES = {"token": "dapo", "sequence": "grpo"}


def trl_config(
    out_dir: str,
    steps: int,
    num_generations: int,
    prompts_per_step: int,
    max_completion_length: int,
    importance_sampling_level: str,
    lr: float,
    seed: int,
    device: str,
):
    """The GRPOConfig of the comparison: one optimiser step = one generation of P prompts x G completions."""
    from trl import GRPOConfig

    batch = prompts_per_step * num_generations
    eps_low, eps_high = EPSILONS[importance_sampling_level]
    return GRPOConfig(
        output_dir=out_dir,
        max_steps=steps,
        # Batch: one generation round per optimiser step, P prompts x G completions, no accumulation.
        per_device_train_batch_size=batch,
        generation_batch_size=batch,  # => steps_per_generation = 1
        gradient_accumulation_steps=1,
        num_generations=num_generations,
        num_iterations=1,  # on-policy: TRL then skips the old-log-prob forward
        shuffle_dataset=False,
        # Sampling: exactly max_completion_length new tokens (EOS suppressed until then).
        max_completion_length=max_completion_length,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs={"min_new_tokens": max_completion_length},
        use_vllm=False,
        # Objective: GRPO (token ratios) or GSPO (sequence ratios), no KL.
        importance_sampling_level=importance_sampling_level,
        loss_type=LOSS_TYPES[importance_sampling_level],
        beta=0.0,
        epsilon=eps_low,
        epsilon_high=eps_high,
        scale_rewards="group",
        log_completions=False,
        **trl_training_args(lr, seed, device),
    )


def run_trl(
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
) -> list[float]:
    """Train TRL's GRPOTrainer for ``steps`` optimiser steps and return each step's wall time (seconds).

    Args:
        model_dir: Saved VLM folder (e.g. from ``build_model``).
        rows: Prompts as ``{"image": PIL image, "question": str}``; ``prompts_per_step * steps`` are used.
        steps: Optimiser steps to run (the first is warm-up for the caller's median).
        num_generations: Completions per prompt (G).
        prompts_per_step: Prompts per optimiser step.
        max_completion_length: New tokens per completion (forced: EOS is suppressed until then).
        importance_sampling_level: ``token`` (GRPO) or ``sequence`` (GSPO).
        lr: AdamW learning rate.
        seed: Seed of sampling and data order.
        out_dir: TRL's output_dir (nothing is saved there); a temporary folder if None.
        vision: ``frozen`` (the vision tower gets no gradient, lightning-vlm's default) or ``train``.
        device: ``cpu`` or ``cuda``.
        stats: If given, filled with what TRL actually did (completion lengths, images encoded, ...).
    """
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForImageTextToText, TrainerCallback
    from trl import GRPOTrainer

    from lightning_vlm.model.processing import load_processor

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(model_dir)
    # The stock Qwen2-VL processor needs torchvision (its video half); ours is the same class minus video.
    processor = load_processor(model_dir, config)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    if vision == "frozen":
        tower = model.model.visual if hasattr(model.model, "visual") else model.visual
        tower.requires_grad_(False)

    # TRL's VLM dataset format: a conversational "prompt" (string content) and an "image" column;
    # TRL puts the image placeholder in front of the text of the first user turn.
    n = prompts_per_step * steps
    if len(rows) < n:
        raise ValueError(f"run_trl needs {n} rows (prompts_per_step * steps), got {len(rows)}")
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["question"]}], "image": r["image"]} for r in rows[:n]]
    )

    times: list[float] = []
    cpu_times: list[float] = []  # process CPU seconds per step: less sensitive to other load on the machine

    class StepTimer(TrainerCallback):
        # on_step_begin comes after the batch is fetched, on_step_end after optimizer.step() and
        # zero_grad, before logging/saving: the window is exactly one training step.
        def on_step_begin(self, args, state, control, **kwargs):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)

    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="trl-grpo-bench-")
        out_dir = tmp.name
    args = trl_config(
        out_dir, steps, num_generations, prompts_per_step, max_completion_length,
        importance_sampling_level, lr, seed, device,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[StepTimer()],
    )
    if stats is not None:
        _instrument(trainer, stats)
    trainer.train()
    if stats is not None:
        stats["trl_config"] = {
            k: getattr(args, k)
            for k in (
                "per_device_train_batch_size", "generation_batch_size", "steps_per_generation",
                "gradient_accumulation_steps", "num_generations", "num_iterations", "max_completion_length",
                "generation_kwargs", "temperature", "importance_sampling_level", "loss_type", "beta",
                "epsilon", "epsilon_high", "scale_rewards", "learning_rate", "optim", "lr_scheduler_type",
                "max_grad_norm", "bf16", "use_cpu", "gradient_checkpointing", "use_vllm",
            )
        }  # fmt: skip
        stats["ref_model"] = trainer.ref_model is not None
        stats["cpu_times_s"] = cpu_times
        stats["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        stats["activation_checkpointing"] = bool(getattr(model, "is_activation_checkpointing", False))
        stats["torch_threads"] = torch.get_num_threads()
    if tmp is not None:
        tmp.cleanup()
    return times


def _instrument(trainer, stats: dict) -> None:
    """Count what TRL does per step without changing it: completion lengths, vision-tower calls and
    the patches they encode, generate calls, model forwards, processor calls and their time."""
    import torch

    model = trainer.model
    tower = model.model.visual if hasattr(model.model, "visual") else model.visual
    stats.update(
        completion_lengths=[], vision_calls=0, vision_patches=0, generate_calls=0, generate_s=[],
        processor_calls=0, processor_s=0.0, score_s=[], old_logps_forwards=0,
    )  # fmt: skip

    def count_vision(module, args, kwargs):
        stats["vision_calls"] += 1
        pixels = args[0] if args else kwargs.get("hidden_states", kwargs.get("pixel_values"))
        stats["vision_patches"] += int(pixels.shape[0])

    tower.register_forward_pre_hook(count_vision, with_kwargs=True)

    generate = model.generate

    def timed_generate(*args, **kwargs):
        t = time.perf_counter()
        out = generate(*args, **kwargs)
        stats["generate_calls"] += 1
        stats["generate_s"].append(time.perf_counter() - t)
        prompt_len = kwargs["input_ids"].shape[1]
        stats["generate_batch"] = [int(kwargs["input_ids"].shape[0]), prompt_len]
        # Lengths as TRL counts them: up to and including the first EOS.
        new = out[:, prompt_len:]
        eos = torch.isin(new, torch.tensor(trainer.eos_token_ids, device=new.device))
        lengths = torch.where(
            eos.any(1), eos.int().argmax(1) + 1, torch.full_like(eos[:, 0], new.shape[1], dtype=torch.long)
        )
        stats["completion_lengths"].extend(int(x) for x in lengths)
        return out

    model.generate = timed_generate

    # Image preprocessing runs inside TRL's step (apply_chat_template for generation calls the
    # processor, then the processor runs again on the images for the training forward): time it.
    processor = trainer.processing_class
    call = type(processor).__call__

    class Timed(type(processor)):
        def __call__(self, *args, **kwargs):
            t = time.perf_counter()
            out = call(self, *args, **kwargs)
            stats["processor_calls"] += 1
            stats["processor_s"] += time.perf_counter() - t
            return out

    processor.__class__ = Timed

    score = trainer._generate_and_score_completions

    def timed_score(*args, **kwargs):
        t = time.perf_counter()
        out = score(*args, **kwargs)
        stats["score_s"].append(time.perf_counter() - t)
        stats["old_logps_forwards"] += int(out.get("old_per_token_logps") is not None)
        return out

    trainer._generate_and_score_completions = timed_score
