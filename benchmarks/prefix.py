"""Shared prefix on against off (``model.loop.shared_prefix``): GRPO steps in ONE run, the setting flipped
between steps (interleaved: on, off, on, off, ...), so both see the same machine load.

Settings of benchmarks/grpo.py: its tiny Qwen2-VL (hidden 512, 7 layers, 224 px images), ``--prompts``
prompts x ``--generations`` G completions of exactly ``--new-tokens`` tokens, full fine-tuning with the
vision tower trained, fp32 on CPU, ``--threads`` torch threads, on-policy, beta = 0. Reports, as medians
over the steps of each setting (the first step of each is warm-up and left out):

- the whole step (rollout + training) and the training part alone (the update loop: forward, backward,
  optimiser), as steps per second of on / off, and the training part's process CPU time (less
  sensitive than wall time to other load on a shared machine);
- memory: the bytes of activations saved for backward by the training forward (unique storages, the
  weights left out), the memory that grows with the number of sequences times their length, on / off.
  (CPU torch has no allocator peak counter; a process-wide peak RSS cannot be split between interleaved
  steps.) Under ``--checkpointing`` (``backbone.gradient_checkpointing``) that is what is saved outside the
  checkpointed layers, the layers' inputs included (which torch's checkpoint keeps for the replay); the
  replay's own activations live only during one layer's backward.

    python benchmarks/prefix.py [--steps 14 --prompts 4 --generations 8 --new-tokens 32 --threads 2]
                                [--checkpointing]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from grpo_common import build_model, make_rows
from grpo_ours import run_ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=14, help="optimiser steps, alternating on and off")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpointing", action="store_true", help="backbone.gradient_checkpointing on")
    args = parser.parse_args()

    import torch

    from lightning_vlm.objectives.online import loop

    torch.set_num_threads(args.threads)
    train_times: list[float] = []
    cpu_times: list[float] = []
    saved: list[int] = []
    settings: list[bool] = []
    inner_train = loop.train

    def timed_train(objective, rollouts):  # alternate the setting; time and measure the update loop
        on = len(settings) % 2 == 0
        objective.settings.shared_prefix = on
        settings.append(on)
        weights = {p.untyped_storage().data_ptr() for p in objective.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights:
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        t0, cpu0 = time.perf_counter(), time.process_time()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            inner_train(objective, rollouts)
        train_times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - cpu0)
        saved.append(sum(storages.values()))
        print(f"step {len(settings)} shared_prefix={on}: training {train_times[-1]:.2f} s "
              f"(CPU {cpu_times[-1]:.2f} s), "
              f"saved {saved[-1] / 2**20:.0f} MiB", flush=True)  # fmt: skip

    loop.train = timed_train
    with tempfile.TemporaryDirectory(prefix="prefix-bench-") as tmp:
        model_dir = str(build_model(tmp + "/model", 224, args.seed))
        rows = make_rows(args.prompts * args.steps, 224, args.seed)
        step_times = run_ours(
            model_dir, rows, args.steps, num_generations=args.generations, prompts_per_step=args.prompts,
            max_completion_length=args.new_tokens, vision="train", seed=args.seed, out_dir=tmp + "/run",
            gradient_checkpointing=args.checkpointing,
        )  # fmt: skip

    def median(values: list, on: bool) -> float:
        mine = [v for v, s in zip(values, settings, strict=True) if s == on][1:]  # the first is warm-up
        return statistics.median(mine)

    load = os.getloadavg()[0]
    print(
        f"load average {load:.1f} on {os.cpu_count()} CPUs after the run; "
        f"GRPO, {args.prompts} prompts x G {args.generations} x {args.new_tokens} new tokens, vision trained, "
        f"fp32, {args.threads} threads, gradient checkpointing {'on' if args.checkpointing else 'off'}; {args.steps} steps alternating shared_prefix on/off, medians after 1 "
        "warm-up step each"
    )
    parts = (("whole step", step_times), ("training part", train_times), ("training CPU time", cpu_times))
    for name, values in parts:
        on, off = median(values, True), median(values, False)
        print(f"  {name:17s}: on {on:.3f} s, off {off:.3f} s; steps/s on / off = {off / on:.2f}x")
    on, off = median(saved, True), median(saved, False)
    print(
        f"  activations saved for backward: on {on / 2**20:.0f} MiB, off {off / 2**20:.0f} MiB; on / off = {on / off:.2f}"
    )


if __name__ == "__main__":
    main()
