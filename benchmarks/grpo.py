"""GRPO, GSPO, DPO and MPO optimiser steps: lightning-vlm against TRL 1.16's GRPOTrainer and DPOTrainer.

Both frameworks train the same saved tiny Qwen2-VL folder (Qwen2-VL's architecture scaled down as in
benchmarks/preference.py, so that at 224 pixels one image encoding costs about one language-model
pass over a sequence) on the same synthetic prompts, one 224 x 224 image each, full fp32 on CPU
(bf16 autocast on CUDA), AdamW at a constant learning rate, no weight decay, no gradient clipping, no
gradient checkpointing.

GRPO/GSPO: ``--prompts`` prompts, ``--generations`` (G) sampled completions per prompt, exactly
``--new-tokens`` new tokens per completion (EOS is held back until then), on-policy (one optimisation
pass per rollout, so no old-log-prob forward), beta = 0 (no reference forward), DAPO token
normalisation (GSPO: the mean over sequences), vision tower frozen (``--vision``), a reward that costs
nothing (completion length). A step runs from the batch of prompts (fetched: the prompt rows, no
image work) to the end of the optimiser step: generation, reward, advantages, the training forward
and backward, the optimiser.

DPO/MPO (against DPOTrainer; MPO there is loss_type ["sigmoid", "bco_pair", "sft"] with our default
weights 0.8 / 0.2 / 1.0, beta 0.1 on both sides): ``--pairs`` pairs per step, chosen and rejected
texts of exactly ``--response-tokens`` tokens (then each template's end of turn), full fine-tuning
with the vision tower (``--pref-vision``), the reference model's forward in every step on both sides
(a frozen copy; no precomputed reference log-probs). A step runs from the end of the previous one:
fetching and collating the batch (images processed by each side's collator, in the training
process on both: ``num_workers=0``), the policy and reference forwards, backward, optimiser.

Each (framework, objective) runs in its own subprocess; the first step is warm-up and is left out of
the median. lightning-vlm also runs with its shared prefix off (``ours-off``: the objective kwargs in
``grpo_common.PREFIX_OFF``; GRPO/GSPO's ``loop.shared_prefix``, DPO/MPO's ``shared_prefix``). Prints per variant
the median, steps per second, what it did per step (completion tokens, vision-tower calls and patches,
process CPU time, which is less sensitive than wall time to other load on a shared machine) and its
peak memory (the process's peak RSS on CPU, torch's peak allocation on CUDA; "above imports" leaves
out the RSS of each framework's imported libraries), then per objective the lightning-vlm / TRL
steps-per-second and peak-memory ratios and ours' prefix on / off steps-per-second ratio.

TRL is an optional benchmark extra, never a runtime dependency. It needs its own environment,
which keeps this project's pins; both sides run with that environment's interpreter:

    python3 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install -e . -r benchmarks/requirements-trl.txt   # torch==2.13.0, trl==1.16.0
    /work/trl-venv/bin/python benchmarks/grpo.py --threads 2 [--only trl] [--objectives dpo mpo] [--steps 6]

Measured side by side on the 2-core CPU (2026-11-30, ``--threads 1 --prompts 4 --new-tokens 32 --vision
train``, other load on the cores, two runs; the table is in docs/online_rl.md#measured): lightning-vlm /
TRL steps per second GRPO x3.41-3.51, GSPO x3.52-3.53, DPO x1.63-1.69, MPO x1.61-1.63 (targets x4, x4,
x2.5, x2.5: not met); peak RSS ours / TRL 0.47-0.50, 0.48-0.51, 0.98-1.06, 0.95-1.03 (target <= 0.5);
ours with the shared prefix on / off x1.59-1.86 (GRPO), x1.66-1.99 (GSPO), x1.16-1.17 (DPO), x1.15 (MPO).
With ``--threads 2`` the other load made the wall and CPU times unusable that night.

Files: this one holds the command line, which starts each (framework, objective) as ``grpo.py
--variant framework:objective`` in its own subprocess and prints the ratios; lightning-vlm's sides are
benchmarks/grpo_ours.py (``run_ours``) and benchmarks/preference_ours.py (``run_ours_preference``),
TRL's benchmarks/grpo_trl.py (``run_trl``) and benchmarks/preference_trl.py (``run_trl_preference``);
benchmarks/grpo_common.py holds what both share (the tiny model, the prompts and pairs, the reward,
the summary, the peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from grpo_common import (
    OBJECTIVES,
    PREFERENCE,
    PREFIX_OFF,
    build_model,
    make_pairs,
    make_rows,
    peak_memory,
    summarize,
)

TARGETS = {"grpo": 4.0, "gspo": 4.0, "dpo": 2.5, "mpo": 2.5}  # issue 15: lightning-vlm / TRL steps per second
MEMORY_TARGET = 0.5  # issue 15: lightning-vlm's peak memory / TRL's
FRAMEWORKS = ("ours", "ours-off", "trl")  # ours-off: ours with PREFIX_OFF's objective kwargs


def _variant(args: argparse.Namespace) -> None:
    """Run one (framework, objective) in this process and print its result as one JSON line."""
    framework, objective = args.variant.split(":")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if framework == "trl":  # the libraries' own memory, before any model: "above imports" leaves it out
        from trl import DPOTrainer, GRPOTrainer  # noqa: F401
    else:
        import lightning  # noqa: F401

        from lightning_vlm.objectives import DPO, GRPO  # noqa: F401
    imports_mib = peak_memory()["peak_rss_mib"]
    kwargs = {"objective_kwargs": PREFIX_OFF[objective]} if framework == "ours-off" else {}
    stats: dict = {}
    common = dict(lr=args.lr, seed=args.seed, device=args.device, stats=stats)
    if objective in PREFERENCE:
        from preference_ours import run_ours_preference
        from preference_trl import run_trl_preference

        run = run_trl_preference if framework == "trl" else run_ours_preference
        pairs = make_pairs(make_rows(args.pairs * args.steps, args.image_size, args.seed), args.model_dir,
                           args.response_tokens)  # fmt: skip
        times = run(args.model_dir, pairs, args.steps, objective, pairs_per_step=args.pairs,
                    vision=args.pref_vision, **common, **kwargs)  # fmt: skip
    else:
        from grpo_ours import run_ours
        from grpo_trl import run_trl

        run = run_trl if framework == "trl" else run_ours
        rows = make_rows(args.prompts * args.steps, args.image_size, args.seed)
        times = run(
            args.model_dir, rows, args.steps,
            num_generations=args.generations, prompts_per_step=args.prompts,
            max_completion_length=args.new_tokens, importance_sampling_level=OBJECTIVES[objective],
            vision=args.vision, **common, **kwargs,
        )  # fmt: skip
    memory = {**peak_memory(args.device), "imports_rss_mib": imports_mib}
    print(
        "RESULT "
        + json.dumps({"variant": args.variant, **summarize(times), **memory, "stats": stats}, default=str)
    )


def _describe(res: dict, steps: int) -> str:
    """What a variant did per step, beyond its time: tokens, vision work, CPU time, peak memory."""
    st, extra = res["stats"], ""
    lengths = st.get("completion_lengths") or st.get("completion_tokens") or []
    if lengths:
        extra += f"  completion tokens {min(lengths)}-{max(lengths)}"
    if "vision_calls" in st:
        extra += (
            f"  vision calls/step {st['vision_calls'] / steps:.0f} ({st['vision_patches'] // steps} patches)"
        )
    if st.get("generate_s") and st.get("score_s"):
        gen = statistics.median(st["generate_s"][1:] or st["generate_s"])
        score = statistics.median(st["score_s"][1:] or st["score_s"])
        extra += (
            f"  [generate {gen:.2f} s, rollout+score {score:.2f} s, train {res['median_s'] - score:.2f} s]"
        )
    if st.get("cpu_times_s"):
        extra += f"  CPU time {statistics.median(st['cpu_times_s'][1:] or st['cpu_times_s']):.2f} s/step"
    extra += f"  peak RSS {res['peak_rss_mib']:.0f} MiB ({res['peak_rss_mib'] - res['imports_rss_mib']:.0f} above imports)"
    if "peak_cuda_mib" in res:
        extra += f"  peak CUDA {res['peak_cuda_mib']:.0f} MiB"
    if hasattr(os, "getloadavg"):
        extra += f"  (load average {os.getloadavg()[0]:.1f} after)"
    return extra


def _cpu(res: dict) -> float | None:
    """Median process CPU seconds per step (warm-up left out), or None if not recorded."""
    cpu = res["stats"].get("cpu_times_s")
    return statistics.median(cpu[1:] or cpu) if cpu else None


def _summary(results: dict, objectives: list[str]) -> None:
    """The ratios: lightning-vlm / TRL steps per second (wall, and CPU time: less sensitive to other load)
    and peak memory, and ours with the prefix on / off."""
    print(f"{'objective':<10}{'ours/TRL steps/s':>17}{'target':>8}{'(CPU time)':>11}{'ours/TRL peak RSS':>19}"
          f"{'above imports':>15}{'prefix on/off steps/s':>23}")  # fmt: skip
    for o in objectives:
        ours, off, trl = (results.get((f, o)) for f in FRAMEWORKS)
        cells = ["-"] * 5
        if ours and trl:
            mem = "peak_cuda_mib" if "peak_cuda_mib" in ours else "peak_rss_mib"
            cells[0] = f"x{trl['median_s'] / ours['median_s']:.2f}"
            if _cpu(ours) and _cpu(trl):
                cells[1] = f"x{_cpu(trl) / _cpu(ours):.2f}"
            cells[2] = f"x{ours[mem] / trl[mem]:.2f}"
            above = [r["peak_rss_mib"] - r["imports_rss_mib"] for r in (ours, trl)]
            cells[3] = f"x{above[0] / above[1]:.2f}"
        if ours and off:
            cells[4] = f"x{off['median_s'] / ours['median_s']:.2f}"
        target = ">= x" + str(TARGETS[o])
        print(
            f"{o.upper():<10}{cells[0]:>17}{target:>8}{cells[1]:>11}{cells[2]:>19}{cells[3]:>15}{cells[4]:>23}"
        )
    print(f"(targets: steps/s as shown, peak memory ours/TRL <= x{MEMORY_TARGET}; 'above imports' leaves out the RSS "
          "of each framework's libraries)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["trl", "ours"], help="run one framework only (ours: on and off)")
    parser.add_argument("--no-prefix-off", action="store_true", help="skip ours with the shared prefix off")
    every = [*OBJECTIVES, *PREFERENCE]
    parser.add_argument("--objectives", nargs="+", default=every, choices=every)
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per run (the first is warm-up)")
    parser.add_argument("--prompts", type=int, default=2, help="GRPO/GSPO: prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="GRPO/GSPO: completions per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=16, help="GRPO/GSPO: new tokens per completion")
    parser.add_argument(
        "--vision", default="frozen", choices=["frozen", "train"], help="GRPO/GSPO's vision tower"
    )
    parser.add_argument("--pairs", type=int, default=4, help="DPO/MPO: preference pairs per step")
    parser.add_argument(
        "--response-tokens", type=int, default=32, help="DPO/MPO: tokens per chosen/rejected text"
    )
    parser.add_argument("--pref-vision", default="train", choices=["frozen", "train"], help="DPO/MPO's tower")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-dir", help="saved VLM folder; default: build the benchmark's tiny Qwen2-VL")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's)")
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
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"GRPO/GSPO step: {args.prompts} prompts x {args.generations} generations x {args.new_tokens} new tokens, "
        f"vision {args.vision}. DPO/MPO step: {args.pairs} pairs of {args.response_tokens}-token responses, vision "
        f"{args.pref_vision}. {args.image_size}px images, device {args.device}; median of {args.steps - 1} steps "
        f"after 1 warm-up ({os.cpu_count()} CPUs, {args.threads or 'default'} torch threads, load average "
        f"{load:.1f} at start)"
    )
    if load > 1.0:
        print(
            f"  warning: load average {load:.1f} on {os.cpu_count()} CPUs: other processes share the cores; "
            "multi-threaded torch then slows down many times over (its threads wait on each other), so "
            "wall times are not comparable between runs. Rerun when the machine is idle, or use --threads 1."
        )
    results: dict[tuple[str, str], dict] = {}
    for objective in args.objectives:
        for framework in FRAMEWORKS:
            if (args.only and not framework.startswith(args.only)) or (
                framework == "ours-off" and (args.no_prefix_off or objective not in PREFIX_OFF)
            ):
                continue
            cmd = [sys.executable, __file__, "--variant", f"{framework}:{objective}"]
            for flag in ("steps", "prompts", "generations", "new_tokens", "vision", "pairs", "response_tokens",
                         "pref_vision", "image_size", "lr", "seed", "device", "model_dir", "threads"):  # fmt: skip
                if getattr(args, flag) is not None:
                    cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if args.verbose or proc.returncode:
                sys.stderr.write(proc.stdout + proc.stderr)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"  {framework:8s} {objective}: failed (exit {proc.returncode})")
                continue
            res = results[framework, objective] = json.loads(line[len("RESULT ") :])
            print(
                f"  {framework:8s} {objective}: median {res['median_s']:.3f} s/step ({res['steps_per_s']:.3f} steps/s;"
                f" min {res['min_s']:.3f}, max {res['max_s']:.3f}){_describe(res, args.steps)}"
            )
    _summary(results, args.objectives)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
