"""benchmarks/mfu.py: the CPU smoke run (--tiny) trains SFT and GRPO steps through the objectives and prints
model FLOPs per step that match the formula computed here by hand from the tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def hand_flops(seq_lens: list[int], scored: int, images: int) -> int:
    # --tiny: h 64, 2 layers, 4 heads (head_dim 16), 2 KV heads, intermediate 128, vocab 1024; vision depth 2,
    # width 32, MLP ratio 4, 14 px patches of 3 x 2 frames, 2x2 merge into h; 56 px images: 4 x 4 = 16 patches.
    lm = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)  # q, k, v, o, gate/up/down: 73,728
    head = 64 * 1024
    vision = 3 * 2 * 14 * 14 * 32 + 2 * (3 * 32 * 32 + 32 * 32 + 2 * 4 * 32 * 32)  # patch embed, qkv, proj, MLP
    merger = 128 * 128 + 128 * 64
    p = 16
    per_image = 6 * p * vision + 6 * (p // 4) * merger + 12 * 2 * 32 * p * p
    attention = 12 * 2 * 64 * sum(t * t for t in seq_lens)
    return 6 * lm * sum(seq_lens) + attention + 6 * head * scored + images * per_image


def test_tiny_run_prints_the_hand_computed_flops(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mfu.py"), "--tiny", "--steps", "2"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["objective"]: r for r in (json.loads(line[7:]) for line in done.stdout.splitlines()
                                           if line.startswith("RESULT "))}  # fmt: skip
    assert set(results) == {"sft", "grpo"}
    sft, grpo = results["sft"], results["grpo"]
    assert sft["seq_lens"] == [48, 48] and sft["patches"] == [16, 16]  # 2 rows of exactly --seq-len tokens
    assert 0 < sft["scored"] < 96
    prompt = grpo["seq_lens"][0] - 8
    assert grpo["seq_lens"] == [prompt + 8] * 4 and grpo["scored"] == 4 * 8  # 2 prompts x G 2 x 8 new tokens
    assert grpo["patches"] == [16, 16]  # each prompt's image encoded once for its G samples
    for r in (sft, grpo):
        assert r["flops"] == hand_flops(r["seq_lens"], r["scored"], len(r["patches"]))
        assert r["mfu"] == r["flops"] / r["seconds"] / 989e12  # the default peak
        assert r["peak_memory_gib"] is None and r["tokens_per_s"] > 0
    assert "peak memory n/a" in done.stdout and "peak 989 TFLOP/s" in done.stdout
