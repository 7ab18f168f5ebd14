"""The shared part of benchmarks/grpo.py (lightning-vlm against TRL's GRPOTrainer and DPOTrainer): the
settings both sides use, the benchmark's tiny Qwen2-VL, the synthetic prompts and preference pairs, the
length reward in each framework's signature, the summary of per-step times and the peak memory.

Imported by both sides: benchmarks/grpo.py (ours and the orchestration), benchmarks/preference_ours.py,
and TRL's side (benchmarks/grpo_trl.py, benchmarks/preference_trl.py), which runs in TRL's own
environment. Uses only the standard library at import time.
"""

from __future__ import annotations

import random
import resource
import statistics
from pathlib import Path

OBJECTIVES = {"grpo": "token", "gspo": "sequence"}  # objective -> TRL importance_sampling_level
PREFERENCE = ("dpo", "mpo")  # against TRL's DPOTrainer
# The preference objectives' settings, lightning-vlm's defaults (objectives/preference/mpo.py): beta, and
# MPO's weights of its DPO sigmoid, BCO pair and SFT terms (TRL: loss_type ["sigmoid", "bco_pair", "sft"]).
BETA = 0.1
MPO_WEIGHTS = (0.8, 0.2, 1.0)
# lightning-vlm's objective kwargs of the "shared prefix off" variant, per objective (run with the prefix on,
# the default, and off; an objective not listed runs with its defaults only).
PREFIX_OFF = {"grpo": {"loop": {"shared_prefix": False}}, "gspo": {"loop": {"shared_prefix": False}},
              "dpo": {"shared_prefix": False}, "mpo": {"shared_prefix": False}}  # fmt: skip
# GSPO's clipping range (the paper's 3e-4 / 4e-4); GRPO keeps TRL's and our default 0.2 / 0.2.
EPSILONS = {"token": (0.2, 0.2), "sequence": (3e-4, 4e-4)}
# The one-image tasks of the synthetic data ("compare" shows two images).
TASKS = ("colour", "shape", "count", "position")


def trl_training_args(lr: float, seed: int, device: str) -> dict:
    """The TrainingArguments both TRL configs share: plain AdamW at a constant lr without clipping or weight decay
    (lightning-vlm's defaults), fp32 on CPU and bf16 autocast on CUDA, no gradient checkpointing (TRL's default is
    on, ours off), collation in the training process (as ours), nothing outside the step."""
    cuda = device.startswith("cuda")
    return dict(learning_rate=lr, optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="constant",
                warmup_steps=0, max_grad_norm=0.0, use_cpu=not cuda, bf16=cuda, fp16=False,
                gradient_checkpointing=False, report_to="none", logging_strategy="no", save_strategy="no",
                eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
                seed=seed, data_seed=seed)  # fmt: skip


def bench_trainer(steps: int, seed: int, device: str, callbacks: list):
    """The Lightning Trainer of our sides: ``steps`` optimiser steps, fp32 on CPU (bf16-mixed on CUDA), nothing
    outside the step (no logger, checkpoints, progress bar, summary or validation)."""
    import lightning as L

    L.seed_everything(seed)
    cuda = device.startswith("cuda")
    return L.Trainer(max_steps=steps, accelerator="gpu" if cuda else "cpu", devices=1,
                     precision="bf16-mixed" if cuda else "32-true", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=callbacks)  # fmt: skip


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


def make_pairs(rows: list[dict], model_dir: str, n_tokens: int = 32) -> list[dict]:
    """``rows`` with a ``chosen`` and a ``rejected`` response text that each tokenise to exactly ``n_tokens``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for i, row in enumerate(rows):
        wrong = rows[(i + 1) % len(rows)]["answer"]
        texts = [f"The answer is {row['answer']}.", f"I think it is {wrong}, but I am not sure."]
        for k, text in enumerate(texts):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            filler = tok(" because the picture shows it", add_special_tokens=False)["input_ids"]
            while len(ids) < n_tokens:
                ids += filler
            texts[k] = tok.decode(ids[:n_tokens])
            if len(tok(texts[k], add_special_tokens=False)["input_ids"]) != n_tokens:
                raise ValueError(f"pair {i}: {texts[k]!r} does not tokenise back to {n_tokens} tokens")
        out.append({**row, "chosen": texts[0], "rejected": texts[1]})
    return out


def peak_memory(device: str = "cpu") -> dict:
    """The process's peak resident memory so far (MiB), and on CUDA the peak memory torch allocated.

    Read from /proc/self/status (VmHWM, which starts afresh at exec): ``ru_maxrss`` carries the parent's
    RSS at fork over into the child, so a child that uses less than its parent would report the parent's."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))
        out = {"peak_rss_mib": int(line.split()[1]) / 1024}  # kB
    else:
        out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if device.startswith("cuda"):
        import torch

        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


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
