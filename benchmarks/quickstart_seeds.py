"""The README quickstart over seeds and torch thread counts: held-out accuracy before and after each
stage, as median [min-max]. Tiny-model training is chaotic and CPU float reduction order depends on
the thread count, so a learning claim is only made when it holds in every run of this grid.

    python benchmarks/quickstart_seeds.py --seeds 0 1 2 --threads 1 2 --jobs 2
    python benchmarks/quickstart_seeds.py --rl zoo/tiny_qwen2vl_rloo.yaml --set model.init_args.lr=5e-5

Each (seed, threads) run draws its own synthetic data (``synthetic.seed``), training shuffle
(``data.seed``), ``seed_everything`` and rollout seed, trains SFT from scratch, then the RL stage
from that SFT export. Runs go to ``--out`` (default ``runs/seeds``); SFT exports are reused when
present, so RL settings can be compared on the same SFT models.
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _config(recipe: Path, run: Path, data: Path, seed: int, threads: int, sets: list[str]) -> dict:
    cfg = yaml.safe_load(recipe.read_text())
    cfg["seed_everything"], cfg["torch_threads"], cfg["report_held_out"] = seed, threads, True
    cfg["overwrite"] = True  # a rerun of the grid replaces its RL runs (an SFT export is reused, not rerun)
    trainer = cfg["trainer"]
    # The run folder: ExportHF writes run/hf.
    trainer["default_root_dir"], trainer["logger"], trainer["enable_progress_bar"] = str(run), False, False
    callbacks = []
    for cb in trainer.get("callbacks", []):
        cb = copy.deepcopy(cb)
        name = cb["class_path"].rsplit(".", 1)[-1]
        if name == "ModelCheckpoint":
            continue  # not needed to measure; saves disk and time
        if name == "RolloutCallback":
            cb["init_args"]["seed"] = seed
            cb["init_args"]["table_every_n_steps"] = 0
        callbacks.append(cb)
    trainer["callbacks"] = callbacks
    d = cfg["data"]["init_args"]
    d["synthetic"] = {**d["synthetic"], "out": str(data), "seed": seed}
    d["seed"] = seed
    for split in ("train", "val"):
        d[split] = str(data / Path(d[split]).name)
    for item in sets:
        key, value = item.split("=", 1)
        node = cfg
        *parents, last = key.split(".")
        for p in parents:  # list items by index: trainer.callbacks.0.init_args.temperature
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[int(last) if isinstance(node, list) else last] = yaml.safe_load(value)
    return cfg


def _fit(cfg: dict, path: Path) -> dict[str, tuple[float, float]]:
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "lightning_vlm.cli", "fit", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if out.returncode:
        raise RuntimeError(f"{path}: exit {out.returncode}\n{out.stderr[-3000:]}")
    rows = re.findall(r"^\s+(\S+)\s+([-\d.na]+)\s+([-\d.na]+)\s*$", out.stdout, re.M)
    return {k: (float(a), float(b)) for k, a, b in rows}


def _one(args, seed: int, threads: int) -> tuple[int, int, dict, dict]:
    base = Path(args.out) / f"s{seed}_t{threads}"
    data = Path(args.out) / f"data_s{seed}"
    sft_run = base / "sft"
    sft = {}
    if not (sft_run / "hf" / "config.json").exists():
        cfg = _config(ROOT / args.sft, sft_run, data, seed, threads, args.sft_set)
        sft_run.mkdir(parents=True, exist_ok=True)
        sft = _fit(cfg, base / "sft.yaml")
        (base / "sft_report.yaml").write_text(yaml.safe_dump({k: list(v) for k, v in sft.items()}))
    else:
        saved = yaml.safe_load((base / "sft_report.yaml").read_text())
        sft = {k: tuple(v) for k, v in saved.items()}
    name = Path(args.rl).stem + (f"_{args.tag}" if args.tag else "")
    sets = [f"model.init_args.backbone.model_name_or_path={sft_run / 'hf'}", *args.set]
    rl = _fit(_config(ROOT / args.rl, base / name, data, seed, threads, sets), base / f"{name}.yaml")
    return seed, threads, sft, rl


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sft", default="zoo/tiny_qwen2vl_sft.yaml")
    parser.add_argument("--rl", default="zoo/tiny_qwen2vl_gspo.yaml")
    parser.add_argument("--set", action="append", default=[], help="dotted.key=yaml_value on the RL recipe")
    parser.add_argument("--sft-set", action="append", default=[], help="the same, on the SFT recipe")
    parser.add_argument("--tag", default="", help="suffix of the RL runs' folders (compare settings)")
    parser.add_argument("--out", default="runs/seeds")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (mind the thread counts)")
    args = parser.parse_args()
    grid = [(s, t) for s in args.seeds for t in args.threads]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda st: _one(args, *st), grid))
    sft_key, rl_key = "val/accuracy", "val/rewards/accuracy"
    print(f"\n| seed | threads | SFT before | SFT after = RL before | {Path(args.rl).stem} after | RL gain |")
    print("| --- | --- | --- | --- | --- | --- |")
    gains, sft_after, rl_after = [], [], []
    for seed, threads, sft, rl in sorted(results):
        before, after = rl[rl_key]
        gains.append(after - before)
        sft_after.append(sft[sft_key][1])
        rl_after.append(after)
        print(
            f"| {seed} | {threads} | {sft[sft_key][0]:.3f} | {before:.3f} | {after:.3f} | {after - before:+.3f} |"
        )
    print(f"\nSFT after: {_summary(sft_after)}; RL after: {_summary(rl_after)}; RL gain: {_summary(gains)}")


if __name__ == "__main__":
    main()
