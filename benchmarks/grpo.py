"""One GRPO and one GSPO optimiser step: lightning-vlm against TRL's GRPOTrainer, same model and batch.

Both frameworks train the same saved tiny Qwen2-VL folder (Qwen2-VL's architecture scaled down as in
benchmarks/preference.py, so that at 224 pixels one image encoding costs about one language-model
pass over a sequence) on the same prompts: ``--prompts`` prompts with one 224 x 224 image each,
``--generations`` (G) sampled completions per prompt, exactly ``--new-tokens`` new tokens per
completion (EOS is held back until then), on-policy (one optimisation pass per rollout, so no
old-log-prob forward), beta = 0 (no reference forward), DAPO token normalisation (GSPO: the mean
over sequences), AdamW at a constant learning rate without gradient clipping, full fp32 on CPU
(bf16 autocast on CUDA), no gradient checkpointing, a reward that costs nothing (completion
length). A step is everything between fetching the batch and the end of the optimiser step:
generation, reward, advantages, the training forward and backward, the optimiser. Each
(framework, objective) runs in its own subprocess; the first step is warm-up and is left out of
the median. Prints the medians, steps per second and the lightning-vlm / TRL steps-per-second
ratio (how many times faster lightning-vlm is), plus what TRL did per step (vision-tower calls and
patches, generation time, process CPU time, which is less sensitive than wall time to other load
on a shared machine).

TRL is an optional benchmark extra, never a runtime dependency. It needs its own environment,
which keeps this project's pins:

    python3 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install -e . -r benchmarks/requirements-trl.txt   # torch==2.13.0, trl==1.16.0
    /work/trl-venv/bin/python benchmarks/grpo.py [--only trl] [--steps 4 --prompts 2 --generations 8 --new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OBJECTIVES = {"grpo": "token", "gspo": "sequence"}  # objective -> TRL importance_sampling_level
# GSPO's clipping range (the paper's 3e-4 / 4e-4); GRPO keeps TRL's and our default 0.2 / 0.2.
EPSILONS = {"token": (0.2, 0.2), "sequence": (3e-4, 4e-4)}
# GRPO: DAPO normalisation (TRL's default: token sum / token count). GSPO: TRL's documented GSPO recipe,
# loss_type "grpo" = mean over sequences of the sequence loss, which is lightning_vlm.losses.gspo_loss.
# With every completion exactly max_completion_length long the two normalisations coincide anyway.
LOSS_TYPES = {"token": "dapo", "sequence": "grpo"}
# The one-image tasks of the synthetic data ("compare" shows two images).
TASKS = ("colour", "shape", "count", "position")


# --------------------------------------------------------------------------------------------- shared


def build_model(out_dir: str | Path, image_size: int = 224, seed: int = 0) -> Path:
    """Save the benchmark's tiny Qwen2-VL to ``out_dir`` (images resized to exactly ``image_size``^2)."""
    from lightning_vlm.model.tiny import TinyVLM, save_tiny_vlm

    pixels = image_size**2
    spec = TinyVLM(
        family="qwen2_vl",
        hidden_size=512,
        num_layers=7,
        vision_depth=8,
        vision_hidden_size=320,
        min_pixels=pixels,
        max_pixels=pixels,
        seed=seed,
    )
    return save_tiny_vlm(spec, out_dir)


def make_rows(n: int, image_size: int = 224, seed: int = 0) -> list[dict]:
    """``n`` synthetic prompts, each ``{"image": PIL RGB image, "question": str, "answer": str}``."""
    from lightning_vlm.data.synthetic import make_example

    rows = []
    for i in range(n):
        rng = random.Random(f"grpo-bench-{seed}-{i}")
        images, question, answer = make_example(rng, TASKS[i % len(TASKS)], image_size)
        rows.append({"image": images[0].convert("RGB"), "question": question, "answer": answer})
    return rows


def length_reward(completions, **kwargs) -> list[float]:
    """A reward that costs nothing: the completion's length in characters (TRL reward-function signature)."""
    out = []
    for c in completions:
        text = c[-1]["content"] if isinstance(c, list) else c
        out.append(float(len(text)))
    return out


def our_length_reward(prompts, completions, **row) -> list[float]:
    """The same reward with lightning-vlm's reward-function signature."""
    return [float(len(c)) for c in completions]


def summarize(times: list[float]) -> dict:
    """Median and spread of the per-step wall times, the first (warm-up) step left out."""
    timed = times[1:] if len(times) > 1 else times
    median = statistics.median(timed)
    return {
        "median_s": median,
        "steps_per_s": 1.0 / median,
        "min_s": min(timed),
        "max_s": max(timed),
        "times_s": times,
    }


# ------------------------------------------------------------------------------------------------ TRL


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
    cuda = device.startswith("cuda")
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
        # Optimiser: plain AdamW, constant lr, no clipping, no weight decay (lightning-vlm's defaults).
        learning_rate=lr,
        optim="adamw_torch",
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        # Precision and memory: fp32 on CPU, bf16 autocast on CUDA; no gradient checkpointing (TRL's
        # default is on, lightning-vlm's off).
        use_cpu=not cuda,
        bf16=cuda,
        fp16=False,
        gradient_checkpointing=False,
        # Nothing outside the step.
        report_to="none",
        logging_strategy="no",
        log_completions=False,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=seed,
        data_seed=seed,
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


# ------------------------------------------------------------------------------------------------ ours


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
) -> list[float]:
    """Train lightning-vlm's GRPO (``token``) or GSPO (``sequence``) for ``steps`` optimiser steps on the
    same folder, rows and settings as ``run_trl`` and return each step's wall time (seconds): from the
    start of the batch (before the rollout) to the end of its optimiser step."""
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
    backbone = BackboneConfig(model_name_or_path=model_dir, vision=vision)
    common = dict(lr=lr, eps_low=low, eps_high=high, beta=0.0, loop=OnlineSettings(max_grad_norm=None))
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

    L.seed_everything(seed)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        precision="bf16-mixed" if device.startswith("cuda") else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Timer(), rollout, CountVision()],  # the timer first: the rollout is inside the step
    )
    trainer.fit(module, data)
    stats["completion_lengths"] = lengths
    stats["vision_calls"] = vision_calls["calls"]
    stats["vision_patches"] = vision_calls["patches"]
    return times


RUNNERS = {"trl": run_trl, "ours": run_ours}


# ------------------------------------------------------------------------------------------------ main


def _variant(args: argparse.Namespace) -> None:
    """Run one (framework, objective) in this process and print its result as one JSON line."""
    framework, objective = args.variant.split(":")
    torch_threads = os.environ.get("BENCH_THREADS")
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))
    rows = make_rows(args.prompts * args.steps, args.image_size, args.seed)
    stats: dict = {}
    times = RUNNERS[framework](
        args.model_dir, rows, args.steps,
        num_generations=args.generations, prompts_per_step=args.prompts,
        max_completion_length=args.new_tokens, importance_sampling_level=OBJECTIVES[objective],
        lr=args.lr, seed=args.seed, vision=args.vision, device=args.device, stats=stats,
    )  # fmt: skip
    print("RESULT " + json.dumps({"variant": args.variant, **summarize(times), "stats": stats}, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["trl", "ours"], help="run one framework only")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per run (the first is warm-up)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=16, help="new tokens per completion")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--vision", default="frozen", choices=["frozen", "train"])
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-dir", help="saved VLM folder; default: build the benchmark's tiny Qwen2-VL")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads per run (default: torch's); 1 makes CPU time robust to other load",
    )
    parser.add_argument("--verbose", action="store_true", help="show the subprocesses' output")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: framework:objective in-process
    args = parser.parse_args()

    if args.variant:
        _variant(args)
        return

    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="grpo-bench-model-")
        args.model_dir = str(build_model(tmp.name, args.image_size, args.seed))
    frameworks = [args.only] if args.only else ["ours", "trl"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{'/'.join(o.upper() for o in args.objectives)} step: {args.prompts} prompts x {args.generations} "
        f"generations x {args.new_tokens} new tokens, {args.image_size}px images, vision {args.vision}, "
        f"device {args.device}; median of {args.steps - 1} steps after 1 warm-up "
        f"({os.cpu_count()} CPUs, {args.threads or 'default'} torch threads, load average {load:.1f} at start)"
    )
    if load > 1.0:
        print(
            f"  warning: load average {load:.1f} on {os.cpu_count()} CPUs: other processes share the cores; "
            "multi-threaded torch then slows down many times over (its threads wait on each other), so "
            "wall times are not comparable between runs. Rerun when the machine is idle, or use --threads 1."
        )
    results: dict[tuple[str, str], dict] = {}
    for objective in args.objectives:
        for framework in frameworks:
            cmd = [sys.executable, __file__, "--variant", f"{framework}:{objective}"]
            for flag in ("steps", "prompts", "generations", "new_tokens", "image_size", "vision", "lr", "seed",
                         "device", "model_dir"):  # fmt: skip
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            env = dict(os.environ, **({"BENCH_THREADS": str(args.threads)} if args.threads else {}))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if args.verbose or proc.returncode:
                sys.stderr.write(proc.stdout + proc.stderr)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"  {framework:5s} {objective}: failed (exit {proc.returncode})")
                continue
            res = json.loads(line[len("RESULT ") :])
            results[framework, objective] = res
            st = res["stats"]
            lengths = st.get("completion_lengths") or []
            extra = ""
            if lengths:
                extra = f"  completion lengths {min(lengths)}-{max(lengths)}"
            if "vision_calls" in st:
                extra += (
                    f"  vision calls/step {st['vision_calls'] / args.steps:.0f}"
                    f" ({st['vision_patches'] // args.steps} patches)"
                )
            if st.get("generate_s") and st.get("score_s"):
                gen = statistics.median(st["generate_s"][1:] or st["generate_s"])
                score = statistics.median(st["score_s"][1:] or st["score_s"])
                extra += f"  [generate {gen:.2f} s, rollout+score {score:.2f} s, train {res['median_s'] - score:.2f} s]"
            if st.get("cpu_times_s"):
                cpu = statistics.median(st["cpu_times_s"][1:] or st["cpu_times_s"])
                extra += f"  CPU time {cpu:.2f} s/step"
            if hasattr(os, "getloadavg"):
                extra += f"  (load average {os.getloadavg()[0]:.1f} after)"
            print(
                f"  {framework:5s} {objective}: median {res['median_s']:.3f} s/step "
                f"({res['steps_per_s']:.3f} steps/s; min {res['min_s']:.3f}, max {res['max_s']:.3f}){extra}"
            )
    for objective in args.objectives:
        if ("trl", objective) in results and ("ours", objective) in results:
            ratio = results["trl", objective]["median_s"] / results["ours", objective]["median_s"]
            print(f"{objective.upper()}: lightning-vlm / TRL steps per second = {ratio:.2f}x")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
