"""benchmarks/mfu.py: the CPU smoke run (--tiny) trains SFT and GRPO steps through the objectives and prints
model FLOPs per step that match the formula computed here by hand from the tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def hand_flops(tokens: int, attended: int, scored: int, images: int) -> int:
    """``tokens`` through the decoder, ``attended`` query x key pairs, ``scored`` through the head."""
    # --tiny: h 64, 2 layers, 4 heads (head_dim 16), 2 KV heads, intermediate 128, vocab 1024; vision depth 2,
    # width 32, MLP ratio 4, 14 px patches of 3 x 2 frames, 2x2 merge into h; 56 px images: 4 x 4 = 16 patches.
    lm = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)  # q, k, v, o, gate/up/down: 73,728
    head = 64 * 1024
    vision = 3 * 2 * 14 * 14 * 32 + 2 * (3 * 32 * 32 + 32 * 32 + 2 * 4 * 32 * 32)  # patch embed, qkv, proj, MLP
    merger = 128 * 128 + 128 * 64
    p = 16
    per_image = 6 * p * vision + 6 * (p // 4) * merger + 12 * 2 * 32 * p * p
    return 6 * lm * tokens + 12 * 2 * 64 * attended + 6 * head * scored + images * per_image


def test_tiny_run_prints_the_hand_computed_flops(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mfu.py"), "--tiny", "--steps", "2"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["objective"]: r for r in (json.loads(line[7:]) for line in done.stdout.splitlines()
                                           if line.startswith("RESULT "))}  # fmt: skip
    assert set(results) == {"sft", "grpo"}
    sft, grpo = results["sft"], results["grpo"]
    assert sft["passes"] == [[48, 48]] * 2 and sft["patches"] == [16, 16]  # 2 rows of exactly --seq-len tokens
    assert 0 < sft["scored"] < 96
    assert sft["count"] == "per sequence" and sft["flops"] == hand_flops(96, 2 * 48 * 48, sft["scored"], 2)
    # GRPO, 2 prompts of P tokens x G 2 x 8 new tokens, one forward (the default loop) with the shared prefix:
    # each prompt runs once (P x P attention), each of its 2 completions on its cache (8 x (P + 8)).
    P = grpo["passes"][0][0]
    assert P > 16 and grpo["passes"] == [[P, P]] * 2 + [[8, P + 8]] * 4
    assert grpo["count"] == "shared prefix" and grpo["scored"] == 4 * 8
    assert grpo["patches"] == [16, 16]  # each prompt's image encoded once for its G samples
    assert grpo["flops"] == hand_flops(2 * P + 4 * 8, 2 * P * P + 4 * 8 * (P + 8), 32, 2)
    assert "grpo: " in done.stdout and "counted shared prefix" in done.stdout
    for r in (sft, grpo):
        assert r["mfu"] == r["flops"] / r["seconds"] / 989e12  # the default peak
        assert r["peak_memory_gib"] is None and r["tokens_per_s"] > 0
    assert "peak memory n/a" in done.stdout and "peak 989 TFLOP/s" in done.stdout
