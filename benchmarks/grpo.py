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

Files: this one holds lightning-vlm's side (``run_ours``) and the command line, which starts each
(framework, objective) as ``grpo.py --variant framework:objective`` in its own subprocess and prints
the ratios; benchmarks/grpo_trl.py holds TRL's side (``run_trl``), benchmarks/grpo_common.py what both
share (the tiny model, the prompts, the reward, the summary).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grpo_common import EPSILONS, OBJECTIVES, build_model, make_rows, our_length_reward, summarize
from grpo_trl import run_trl

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
    gradient_checkpointing: bool = False,
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
    backbone = BackboneConfig(
        model_name_or_path=model_dir, vision=vision, gradient_checkpointing=gradient_checkpointing
    )
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
