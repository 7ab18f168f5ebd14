"""Held-out accuracy of a model per synthetic task: greedy (the held-out metric), the mean of G samples
at a temperature, and the share of groups whose samples do not all score the same (the groups that
carry a learning signal). Shows where an RL stage can gain: a task sampled at chance has reward spread
but no image-dependent signal.

    python benchmarks/task_breakdown.py runs/tiny_qwen2vl_sft/hf data/synthetic
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from lightning_vlm import BackboneConfig
from lightning_vlm.data import PromptDataModule
from lightning_vlm.data.prompt import PromptCollator
from lightning_vlm.objectives import GSPO
from lightning_vlm.rollout import RolloutCallback
from lightning_vlm.rollout.rewards import accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an exported model folder")
    parser.add_argument("data", help="a synthetic data folder (prompt_val.jsonl)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    module = GSPO(BackboneConfig(model_name_or_path=args.model))
    module.configure_model()
    val = f"{args.data}/prompt_val.jsonl"
    dm = PromptDataModule(train=val, val=val, batch_size=50)
    dm.processor = module.backbone.processor
    dm.setup("fit")
    rows = [dm.datasets["val"][i] for i in range(len(dm.datasets["val"]))]
    raw = [json.loads(line) for line in open(val)]
    callback = RolloutCallback(num_generations=args.samples, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, rewards=[accuracy], table_every_n_steps=0,
                               seed=args.seed)  # fmt: skip
    callback.setup(None, module, "fit")
    stats: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for start in range(0, len(rows), 50):
        batch = PromptCollator(dm.processor)(rows[start : start + 50])
        grouped = callback.sample(module, batch).rewards.view(-1, args.samples)
        ids = module.backbone.generate(batch["input_ids"], batch["attention_mask"], batch["vision"],
                                       max_new_tokens=args.max_new_tokens)  # fmt: skip
        answers = [r["answer"] for r in raw[start : start + 50]]
        greedy = accuracy(None, module.backbone.decode(ids), answer=answers)
        for i, group in enumerate(grouped):
            s = stats[raw[start + i].get("task", "all")]
            s["greedy"].append(float(greedy[i] or 0.0))
            s["sampled"].append(float(group.mean()))
            s["mixed"].append(float(0 < group.mean() < 1))
    print("| task | prompts | greedy | sampled | mixed groups |\n| --- | --- | --- | --- | --- |")
    every: dict[str, list[float]] = defaultdict(list)
    for task in sorted(stats):
        s = stats[task]
        for k, v in s.items():
            every[k] += v
        print(f"| {task} | {len(s['greedy'])} | " + " | ".join(f"{sum(s[k]) / len(s[k]):.2f}" for k in s) + " |")
    print(f"| all | {len(every['greedy'])} | " + " | ".join(f"{sum(v) / len(v):.3f}" for v in every.values()) + " |")


if __name__ == "__main__":
    main()
