"""How well untrained critics fit the first returns: the reward-model critic against a new head.

Runs the tiny PPO recipe's rollouts from the SFT policy (no training) and prints the median explained
variance of each critic's values over the returns. Run the SFT and RM recipes first:

    lightning-vlm fit --config zoo/tiny_qwen2vl_sft.yaml && lightning-vlm fit --config zoo/tiny_qwen2vl_rm.yaml
    python benchmarks/critic_init.py

The "new head" critic is the SFT model with a randomly initialised head (as RewardModel starts one),
a stand-in for a value head on the policy. Figures are in docs/ppo.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightning_vlm import BackboneConfig
from lightning_vlm.data import PromptDataModule
from lightning_vlm.data.prompt import PromptCollator
from lightning_vlm.losses import explained_variance
from lightning_vlm.objectives import PPO, RewardModelReward
from lightning_vlm.objectives.online import OnlineSettings
from lightning_vlm.rollout import RolloutCallback


def new_head_critic(sft: str, rm: str, out: Path) -> str:
    shutil.copytree(sft, out)
    hidden = json.loads((Path(rm) / "reward_head.json").read_text())["hidden_size"]
    torch.manual_seed(0)
    weight = torch.randn(1, hidden) / (hidden + 1) ** 0.5
    save_file({"weight": weight, "bias": torch.zeros(1)}, out / "reward_head.safetensors")
    (out / "reward_head.json").write_text(json.dumps({"hidden_size": hidden}))
    return str(out)


def median_ev(sft: str, critic: str, rm: str, prompts: str, rollouts: int) -> float:
    torch.manual_seed(0)
    module = PPO(BackboneConfig(model_name_or_path=sft), critic=BackboneConfig(model_name_or_path=critic),
                 kl_coef=0.2, loop=OnlineSettings(num_iterations=4, mini_batches=2))  # the recipe's  # fmt: skip
    module.configure_model()
    callback = RolloutCallback(num_generations=2, max_new_tokens=6, table_every_n_steps=0,
                               rewards=[RewardModelReward(rm, batch_size=32)])  # fmt: skip
    callback.setup(None, module, "fit")  # binds its engine to the policy, as at fit start
    dm = PromptDataModule(train=prompts, batch_size=16)
    dm.processor = module.backbone.processor
    dm.setup("fit")
    rows = dm.datasets["train"]
    evs = []
    for i in range(rollouts):
        callback.rollouts = i  # the recipe's seeding of rollout i
        r = callback.sample(
            module, PromptCollator(dm.processor)([rows[j] for j in range(16 * i, 16 * i + 16)])
        )
        module.on_rollout([r], "train")  # old and reference log-probs, then advantages, values and returns
        evs.append(float(explained_variance(r.extra["values"], r.extra["returns"], r.completion_mask)))
    return statistics.median(evs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", default="runs/tiny_qwen2vl_sft/hf")
    parser.add_argument("--rm", default="runs/tiny_qwen2vl_rm/hf")
    parser.add_argument("--prompts", default="data/synthetic/prompt_train.jsonl")
    parser.add_argument("--rollouts", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = new_head_critic(args.sft, args.rm, Path(tmp) / "critic")
        for name, critic in (("reward-model critic", args.rm), ("new head on the SFT model", fresh)):
            ev = median_ev(args.sft, critic, args.rm, args.prompts, args.rollouts)
            print(f"{name:<28} median explained variance over {args.rollouts} rollouts: {ev:.3f}")


if __name__ == "__main__":
    main()
