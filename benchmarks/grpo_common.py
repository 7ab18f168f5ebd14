"""The shared part of benchmarks/grpo.py (lightning-vlm against TRL's GRPOTrainer): the settings both
sides use, the benchmark's tiny Qwen2-VL, the synthetic prompts, the length reward in each framework's
signature, and the summary of per-step times.

Imported by both sides: benchmarks/grpo.py (ours and the orchestration) and benchmarks/grpo_trl.py
(TRL's side, which runs in TRL's own environment). Uses only the standard library at import time.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path

OBJECTIVES = {"grpo": "token", "gspo": "sequence"}  # objective -> TRL importance_sampling_level
# GSPO's clipping range (the paper's 3e-4 / 4e-4); GRPO keeps TRL's and our default 0.2 / 0.2.
EPSILONS = {"token": (0.2, 0.2), "sequence": (3e-4, 4e-4)}
# The one-image tasks of the synthetic data ("compare" shows two images).
TASKS = ("colour", "shape", "count", "position")


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
