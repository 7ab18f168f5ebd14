"""RLOO: its advantages and loss against an independent float64 reference, and a CLI run of its recipe."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from lightning_vlm import BackboneConfig, TinyVLM
from lightning_vlm.cli import VLMCLI
from lightning_vlm.losses import StepTotals, rloo_advantages
from lightning_vlm.objectives import RLOO
from lightning_vlm.objectives.online.loop import Chunk
from lightning_vlm.rollout import Rollout, RolloutCallback, SamplingSettings

ROOT = Path(__file__).resolve().parents[3]
B, G, N, MAX_NEW = 2, 4, 5, 6


def _reference(logps, old, ref, rewards, mask, beta, eps, max_new):
    """RLOO written out sample by sample in float64: KL-shaped reward, leave-one-out baseline,
    clipped token surrogate summed over each completion, divided by sequences x max_new."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(B):
        shaped = []
        for k in range(G):
            s = i * G + k
            kl = sum(float(old[s, t] - ref[s, t]) for t in range(N) if mask[s, t])
            shaped.append(float(rewards[s]) - beta * kl)
        for k in range(G):
            s = i * G + k
            advantage = shaped[k] - sum(shaped[j] for j in range(G) if j != k) / (G - 1)
            for t in range(N):
                if mask[s, t]:
                    ratio = torch.exp(logps[s, t] - old[s, t])
                    clipped = torch.clamp(ratio, 1 - eps, 1 + eps)
                    total = total - torch.min(ratio * advantage, clipped * advantage)
    return total / (B * G * max_new)


def _rollout(rewards, mask, old, ref) -> Rollout:
    ids = torch.ones(B, 3, dtype=torch.long)
    return Rollout(
        prompt_ids=ids,
        prompt_mask=torch.ones_like(ids),
        vision={},
        features=None,
        completion_ids=torch.ones(B * G, N, dtype=torch.long),
        completion_mask=mask.long(),
        group_size=G,
        rewards=rewards,
        rewards_per_function={},
        texts=[""] * (B * G),
        truncated=torch.zeros(B * G, dtype=torch.bool),
        keep=torch.ones(B * G, dtype=torch.bool),
        sampling=SamplingSettings(max_new_tokens=MAX_NEW),
        old_logps=old,
        ref_logps=ref,
    )


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_rloo_loss_and_gradients_match_a_float64_reference(beta):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(B * G, generator=g, dtype=torch.float64)
    mask = torch.ones(B * G, N, dtype=torch.float64)
    mask[1, 3:] = 0  # a short completion
    mask[6, 1:] = 0
    old = -torch.rand(B * G, N, generator=g, dtype=torch.float64)
    ref = -torch.rand(B * G, N, generator=g, dtype=torch.float64)
    # Off-policy by up to +-0.3 nats, so that the 0.2 clip acts on some tokens.
    base = old + (torch.rand(B * G, N, generator=g, dtype=torch.float64) - 0.5) * 0.6
    module = RLOO(BackboneConfig(tiny=TinyVLM()), beta=beta, eps=0.2)
    assert module.needs().reference == (beta > 0) and module.needs().old_policy == (beta > 0)
    r = _rollout(rewards, mask, old, ref)
    advantages = module.advantages(r)

    ours_logps = base.clone().requires_grad_(True)
    chunk = Chunk(logps=ours_logps, old_logps=old, ref_logps=ref, advantages=advantages, mask=mask,
                  totals=StepTotals(tokens=mask.sum(), sequences=float(B * G)), rollout=r,
                  samples=list(range(G)), rows=torch.arange(B * G))  # fmt: skip
    loss, _ = module.policy_loss(chunk)
    loss.backward()

    ref_logps = base.clone().requires_grad_(True)
    expected = _reference(ref_logps, old, ref, rewards, mask, beta, 0.2, MAX_NEW)
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(ours_logps.grad, ref_logps.grad, rtol=1e-12, atol=1e-12)
    clipped = ((base - old).abs() > math.log(1.2)) & (mask > 0)
    assert clipped.any() and (ours_logps.grad[clipped & (ref_logps.grad == 0)]).numel() > 0


def test_rloo_advantages_are_leave_one_out_and_need_two_samples():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    advantages, _ = rloo_advantages(rewards, 3)
    assert torch.allclose(advantages, torch.tensor([1.0, -0.5, -0.5, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(rewards, 1)


def _length(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]


def test_rloo_recipe_trains_from_the_cli(tmp_path, synthetic_dir):
    override = {
        "trainer": {"max_steps": 2, "val_check_interval": 1, "limit_val_batches": 1, "logger": False,
                    "default_root_dir": str(tmp_path), "enable_progress_bar": False,
                    "callbacks": [{"class_path": "lightning_vlm.rollout.RolloutCallback",
                                   "init_args": {"num_generations": 4, "max_new_tokens": 4}}]},
        "model": {"init_args": {"backbone": {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}},
                                "beta": 0.1}},
        "data": {"init_args": {"synthetic": None, "train": str(synthetic_dir / "prompt_train.jsonl"),
                               "val": str(synthetic_dir / "prompt_val.jsonl"), "batch_size": 2,
                               "eval_batch_size": 2, "num_workers": 0}},
        }  # fmt: skip
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    cli = VLMCLI(args=["--config", str(ROOT / "zoo" / "tiny_qwen2vl_rloo.yaml"), "--config", str(path)],
                 run=False)  # fmt: skip
    module = cli.model
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, RolloutCallback)]
    callback.rewards = [_length]  # an untrained model answers nothing right: reward what varies
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with module.backbone.reference() as reference:
        ref_before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2  # one rollout, loop.mini_batches = 2 optimiser steps
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "train/kl", "rollout/reward", "val/reward"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    params = dict(module.named_parameters())
    changed = [n for n, p in params.items() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "no trainable weight moved"
    assert all(torch.equal(p, before[n]) for n, p in params.items() if not p.requires_grad)
    with module.backbone.reference() as reference:
        assert all(torch.equal(p, ref_before[n]) for n, p in reference.named_parameters())
