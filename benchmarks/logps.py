"""Completion-only chunked log-probs vs the naive full-logits computation: peak memory and time.

Each variant runs forward + backward on the same batch in its own subprocess (so peak RSS is its
own), on a tiny Qwen2-VL whose vocabulary is resized to Qwen2-VL's real 151,936 tokens, with long
prompts and short completions, the shape of VLM preference and RL batches. Prints medians and the
naive / chunked ratios.

    python benchmarks/logps.py [--batch 4 --prompt 960 --completion 64 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VOCAB = 151_936


def run_variant(variant: str, batch: int, prompt: int, completion: int, repeats: int) -> dict:
    import torch

    from lightning_vlm import BackboneConfig, TinyVLM, VLMBackbone

    torch.manual_seed(0)
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM()))
    bb.load()
    bb.model.resize_token_embeddings(VOCAB)
    length = prompt + completion
    ids = torch.randint(0, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    target = torch.zeros(batch, length, dtype=torch.bool)
    target[:, prompt:] = True
    params = [p for p in bb.model.parameters() if p.requires_grad]

    def step():
        if variant == "chunked":
            logps = bb.token_logps(ids, mask, {}, target)
        elif variant == "naive":
            logits = bb.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            full = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            logps = full * target[:, 1:]
        else:  # "forward": the shared trunk alone, to subtract
            inner, _ = bb._parts(bb.model)
            logps = inner(input_ids=ids, attention_mask=mask).last_hidden_state[:, -completion:]
        logps.sum().backward()
        for p in params:
            p.grad = None

    times = []
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(repeats + 1):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"median_s": statistics.median(times[1:]), "peak_mib": peak / 1024, "model_mib": base_rss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=960)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.batch, args.prompt, args.completion, args.repeats)
    if args.variant:
        print(json.dumps(run_variant(args.variant, *shape)))
        return
    results = {}
    for variant in ("forward", "chunked", "naive"):
        cmd = [sys.executable, __file__, "--variant", variant, "--batch", str(args.batch), "--prompt",
               str(args.prompt), "--completion", str(args.completion), "--repeats", str(args.repeats)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
    b, p, c = args.batch, args.prompt, args.completion
    print(
        f"batch {b} x (prompt {p} + completion {c}) tokens, vocab {VOCAB}, forward+backward, median of {args.repeats}"
    )
    print(f"{'variant':<10}{'median s':>10}{'peak RSS MiB':>14}{'above trunk MiB':>17}")
    trunk = results["forward"]["peak_mib"]
    for name, r in results.items():
        print(f"{name:<10}{r['median_s']:>10.3f}{r['peak_mib']:>14.0f}{r['peak_mib'] - trunk:>17.0f}")
    naive, ours = results["naive"], results["chunked"]
    extra = (naive["peak_mib"] - trunk) / max(1.0, ours["peak_mib"] - trunk)
    print(
        f"naive / chunked: time x{naive['median_s'] / ours['median_s']:.2f}, memory above the trunk x{extra:.1f}"
    )


if __name__ == "__main__":
    main()
