"""Padding-free packed SFT against padded SFT: tokens per second and peak memory, in one run.

Both sides train the same rows (one small image each, text lengths spread 4:1 from ``--short`` to
4 x ``--short`` tokens) on the benchmark's ~26M-parameter Qwen2-VL (benchmarks/grpo_common.py's),
full fine-tuning (tower included), fp32, ``--threads`` threads. Each repeat is one round of ``--rows``
rows, in the training shuffle's order: the padded side cuts it into batches of ``--batch`` rows padded to
their longest, the packed side into micro-batches of up to ``--batch`` x the mean row length tokens
(``data.max_tokens``, lightning_vlm.data.packing.TokenBudgetSampler); each micro-batch is a forward,
a backward and an AdamW step. Each side runs in its own process (so its peak RSS is its own); the driver
alternates them step by step (interleaved repeats, the first left out) and prints the medians and the
packed / padded ratios.

    python benchmarks/packing.py [--rows 32 --batch 8 --short 96 --repeats 5 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_rows(processor, n: int, short: int, seed: int = 0) -> list[dict]:
    """``n`` SFT rows, one 56x56 image each, whose token lengths are spread evenly from short to 4 x short."""
    from lightning_vlm.data.synthetic import make_example

    rows = []
    for i in range(n):
        images, question, answer = make_example(random.Random(f"pack-{seed}-{i}"), "colour", 56)
        target = short + round(3 * short * i / max(1, n - 1))  # spread evenly; the samplers shuffle them
        filler = []
        while True:
            row = {"images": [images[0].convert("RGB")], "__row": i, "__base": "",
                   "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                                {"role": "assistant", "content": " ".join([answer, *filler])}]}  # fmt: skip
            length = len(processor(text=[processor.apply_chat_template(row["messages"], tokenize=False)],
                                   images=[images], add_special_tokens=False)["input_ids"][0])  # fmt: skip
            if not filler and length > short:
                raise SystemExit(f"--short {short} is below a row's length without filler ({length}): raise it")
            if length >= target:
                rows.append({**row, "__len": length})
                break
            filler += ["red"] * max(1, (target - length) // 2)
    return rows


def worker(variant: str, folder: str, args) -> None:
    import torch

    from lightning_vlm import BackboneConfig, VLMBackbone
    from lightning_vlm.data.loaders import ResumableSampler
    from lightning_vlm.data.packing import TokenBudgetSampler
    from lightning_vlm.data.sft import SFTCollator
    from lightning_vlm.losses import sft_loss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bb = VLMBackbone(BackboneConfig(model_name_or_path=folder, vision="train"), disable_dropout=True)
    bb.load()
    params = [p for p in bb.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    rows = make_rows(bb.processor, args.rows, args.short)
    lengths = [r.pop("__len") for r in rows]
    budget = args.batch * round(statistics.mean(lengths))
    collate = SFTCollator(bb.processor, packed=variant == "packed")
    rounds = []
    for seed in range(args.repeats + 1):  # each repeat its own shuffle of the same rows
        if variant == "packed":
            groups = TokenBudgetSampler(lengths, list(range(len(rows))), budget, seed).micro_batches()
        else:
            order = list(ResumableSampler(len(rows), seed))
            groups = [order[k : k + args.batch] for k in range(0, len(order), args.batch)]
        rounds.append([collate([rows[i] for i in g]) for g in groups])  # collated off the clock
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"params": sum(p.numel() for p in params), "budget": budget, "lengths": lengths}), flush=True)
    for line in sys.stdin:
        if line.strip() == "peak":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(json.dumps({"base_mib": base / 1024, "peak_mib": peak / 1024}), flush=True)
            return
        batches = rounds[int(line)]
        start = time.perf_counter()
        for batch in batches:
            mask = batch["labels_mask"]
            logps = bb.token_logps(batch["input_ids"], batch["attention_mask"], batch["vision"], mask,
                                   packed=batch["packed"])  # fmt: skip
            sft_loss(logps, mask)[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        computed = sum(b["attention_mask"].numel() for b in batches) if variant == "padded" else real
        print(json.dumps({"s": seconds, "tokens": real, "computed": computed, "steps": len(batches)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--short", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=("padded", "packed"))
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.folder, args)
        return
    from grpo_common import build_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = str(build_model(Path(tmp) / "model", image_size=56))
        flags = [f"--{k}={v}" for k, v in vars(args).items() if k in ("rows", "batch", "short", "repeats", "threads")]
        procs = {v: subprocess.Popen([sys.executable, __file__, "--worker", v, "--folder", folder, *flags],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for v in ("padded", "packed")}  # fmt: skip

        def ask(variant: str, line: str) -> dict:
            proc = procs[variant]
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            return json.loads(proc.stdout.readline())

        info = {v: json.loads(p.stdout.readline()) for v, p in procs.items()}
        assert info["padded"]["lengths"] == info["packed"]["lengths"]  # the same rows
        runs: dict[str, list[dict]] = {"padded": [], "packed": []}
        for rep in range(args.repeats + 1):
            for v in ("padded", "packed") if rep % 2 else ("packed", "padded"):  # interleaved, alternating first
                runs[v].append(ask(v, str(rep)))
        peaks = {v: ask(v, "peak") for v in procs}
        for p in procs.values():
            p.wait()
    lengths = info["padded"]["lengths"]
    print(f"model: {info['padded']['params'] / 1e6:.1f}M trainable parameters, fp32, {args.threads} threads; "
          f"{args.rows} rows per repeat, lengths {min(lengths)}-{max(lengths)} tokens (mean "
          f"{statistics.mean(lengths):.0f}); padded batches of {args.batch} rows, packed budget "
          f"{info['packed']['budget']} tokens")  # fmt: skip
    out = {}
    print(f"{'variant':<8}{'steps':>6}{'tok/s':>9}{'computed/real':>15}{'peak MiB':>10}{'above model':>12}")
    for v in ("padded", "packed"):
        timed = runs[v][1:]
        rate = statistics.median(r["tokens"] / r["s"] for r in timed)
        waste = statistics.median(r["computed"] / r["tokens"] for r in timed)
        peak, above = peaks[v]["peak_mib"], peaks[v]["peak_mib"] - peaks[v]["base_mib"]
        out[v] = {"tokens_per_s": rate, "peak_mib": peak, "above_model_mib": above}
        print(f"{v:<8}{timed[0]['steps']:>6}{rate:>9.0f}{waste:>15.2f}{peak:>10.0f}{above:>12.0f}")
    speed = out["packed"]["tokens_per_s"] / out["padded"]["tokens_per_s"]
    pairs = zip(runs["packed"][1:], runs["padded"][1:], strict=True)
    paired = sorted((a["tokens"] / a["s"]) / (b["tokens"] / b["s"]) for a, b in pairs)
    print(f"tokens/s ratio per repeat (packed / padded of the same repeat): {', '.join(f'{r:.2f}' for r in paired)}")
    memory = out["packed"]["peak_mib"] / out["padded"]["peak_mib"]
    above = out["packed"]["above_model_mib"] / max(1.0, out["padded"]["above_model_mib"])
    print(f"packed / padded: tokens/s {speed:.2f}x, peak memory {memory:.2f}x ({above:.2f}x above the model)")
    print(json.dumps({"tokens_per_s_ratio": speed, "peak_memory_ratio": memory, "above_model_ratio": above}))


if __name__ == "__main__":
    main()
