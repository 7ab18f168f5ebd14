"""Start-up on big data: how fast ``setup()`` checks the rows of an SFT source, cold and cached.

Builds a synthetic SFT set of ``--rows`` rows in ``--out`` (400 drawn rows repeated, so every row still
opens, decodes and measures its image and renders its conversation), then, for each ``--workers`` count,
times ``SFTDataModule.setup("fit")`` twice with a fresh check cache: the first run checks every row (in
``min(num_workers, CPUs)`` processes when ``num_workers > 1``), the second reads the results cached under
the data's fingerprint. The tiny Qwen2-VL processor of the tests is used (its tokenizer and image
processor do the same work per row as a real one; a real tokenizer's larger vocabulary costs a little
more). Figures are in docs/data.md.

    python benchmarks/row_checks.py --rows 100000 --out /tmp/row_checks --workers 0 2

The script only uses ``SFTDataModule(train=..., num_workers=...)`` and ``setup()``, so it also runs on
a checkout without the cache (``PYTHONPATH=<that checkout>``): its second run then checks again.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from lightning_vlm import BackboneConfig, TinyVLM, VLMBackbone
from lightning_vlm.data import SFTDataModule
from lightning_vlm.data.synthetic import write_synthetic


def build(out: Path, rows: int) -> Path:
    """``rows`` SFT rows in ``out/synthetic/sft_<rows>.jsonl`` (images relative to that folder)."""
    folder = out / "synthetic"
    write_synthetic(folder, n_train=400, n_val=10, image_size=112, seed=0)
    lines = (folder / "sft_train.jsonl").read_text().splitlines()
    path = folder / f"sft_{rows}.jsonl"
    if not path.exists():
        path.write_text("".join(lines[i % len(lines)] + "\n" for i in range(rows)))
    return path


def timed_setup(processor, path: Path, workers: int) -> float:
    dm = SFTDataModule(train=str(path), num_workers=workers)
    dm.processor = processor
    start = time.perf_counter()
    dm.setup("fit")
    assert len(dm.datasets["train"]) > 0
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/row_checks"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    path = build(args.out, args.rows)
    processor = VLMBackbone(BackboneConfig(tiny=TinyVLM(family="qwen2_vl"))).processor
    print(f"{args.rows} rows, {os.cpu_count()} CPUs")
    print("| num_workers | first setup (checks every row) | second setup (cached) |")
    print("| --- | --- | --- |")
    for workers in args.workers:
        os.environ["LIGHTNING_VLM_CACHE"] = tempfile.mkdtemp(prefix="row_checks_cache_")  # cold checks
        cold, cached = (timed_setup(processor, path, workers) for _ in range(2))
        print(
            f"| {workers} | {cold:.1f} s ({args.rows / cold:,.0f} rows/s) "
            f"| {cached:.1f} s ({args.rows / cached:,.0f} rows/s) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
