"""benchmarks/grpo.py (lightning-vlm against TRL): the preference pairs have responses of exactly the asked
token count, and the summary's ratios are TRL / ours in time and ours / TRL in memory. TRL is not needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lightning_vlm.model.tiny import TinyVLM, save_tiny_vlm

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their siblings by module name
    import grpo
    import grpo_common

    return grpo, grpo_common


def test_pairs_tokenise_to_the_asked_length(bench, tmp_path):
    _, common = bench
    folder = str(save_tiny_vlm(TinyVLM(family="qwen2_vl"), tmp_path / "model"))
    pairs = common.make_pairs(common.make_rows(5, image_size=56), folder, n_tokens=32)
    tok = AutoTokenizer.from_pretrained(folder)
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        for text in (p["chosen"], p["rejected"]):
            assert len(tok(text, add_special_tokens=False)["input_ids"]) == 32


def test_summary_ratios(bench, capsys):
    grpo, _ = bench

    def res(median, rss, imports):
        cpu = [9.0, 2 * median, 2 * median]  # the first (warm-up) is left out
        return {
            "median_s": median,
            "peak_rss_mib": rss,
            "imports_rss_mib": imports,
            "stats": {"cpu_times_s": cpu},
        }

    results = {("ours", "dpo"): res(1.0, 600, 400), ("trl", "dpo"): res(3.0, 1000, 200),
               ("ours", "grpo"): res(2.0, 500, 400), ("ours-off", "grpo"): res(3.0, 500, 400)}  # fmt: skip
    grpo._summary(results, ["grpo", "dpo"])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    # 3 s / 1 s (CPU 6 s / 2 s); RSS 600 / 1000; above imports 200 / 800
    assert rows["DPO"] == ["x3.00", ">=", "x2.5", "x3.00", "x0.60", "x0.25", "-"]
    assert rows["GRPO"] == ["-", ">=", "x4.0", "-", "-", "-", "x1.50"]  # no TRL run; prefix off 3 s / on 2 s


def test_peak_memory_is_the_childs_own(bench):
    """Each variant runs in a child of the process that built the model: its peak must not be the parent's
    (``ru_maxrss`` carries the parent's RSS at fork over into the child)."""
    held = bytearray(300 * 2**20)  # the parent's memory, touched
    held[::4096] = b"x" * len(held[::4096])
    code = f"import sys, json; sys.path.insert(0, {str(BENCH)!r}); import grpo_common; print(grpo_common.peak_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out.split(":")[1].strip(" }\n")) < 100  # a bare interpreter, not the parent's 300+ MiB
