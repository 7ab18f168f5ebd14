"""PPO: the critic starts as the reward model, advantages are GAE of KL-shaped rewards (float64 by
hand), training moves the policy and the critic only, metrics, settings and bad input."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_vlm import BackboneConfig, LoraSettings, TinyVLM
from lightning_vlm.data import PromptDataModule
from lightning_vlm.data.prompt import PromptCollator
from lightning_vlm.losses import ppo_losses
from lightning_vlm.model.tiny import ensure_tiny_vlm
from lightning_vlm.objectives import PPO, RewardModel
from lightning_vlm.objectives.online import Chunk, OnlineSettings, RolloutNeeds, loop
from lightning_vlm.rollout import RolloutCallback
from tests.helpers.online import Spy, bind

B, G, NEW = 2, 2, 4


def token_reward(prompts, completions, completion_ids, **row):
    return [float(sum((i + 1) * t for i, t in enumerate(ids)) % 13) / 13 for ids in completion_ids]


def _module(rm_folder, lora=None, loop=None, **kw) -> PPO:
    """A tiny PPO whose critic is the reward model export; ``loop``: keyword arguments of OnlineSettings."""
    torch.manual_seed(0)
    if loop is not None:
        kw["loop"] = OnlineSettings(**loop)
    module = PPO(
        BackboneConfig(tiny=TinyVLM(family="qwen2_vl"), lora=lora),
        critic=BackboneConfig(model_name_or_path=str(rm_folder)),
        **kw,
    )
    module.configure_model()
    return module


def _callback(**kw) -> RolloutCallback:
    return RolloutCallback(**{"num_generations": G, "max_new_tokens": NEW, "rewards": [token_reward],
                              "table_every_n_steps": 0, **kw})  # fmt: skip


def _dm(synthetic_dir, batch_size=B) -> PromptDataModule:
    return PromptDataModule(train=str(synthetic_dir / "prompt_train.jsonl"),
                            val=str(synthetic_dir / "prompt_val.jsonl"), batch_size=batch_size,
                            eval_batch_size=4)  # fmt: skip


def _batch(module, synthetic_dir, n=B) -> dict:
    dm = _dm(synthetic_dir)
    dm.processor = module.backbone.processor
    dm.setup("fit")
    return PromptCollator(dm.processor)([dm.datasets["train"][i] for i in range(n)])


def _fit(module, synthetic_dir, callbacks, steps, **trainer) -> L.Trainer:
    settings = dict(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    t = L.Trainer(callbacks=callbacks, **{**settings, **trainer})
    t.fit(module, _dm(synthetic_dir))
    return t


def _rollout(module, synthetic_dir, callback=None):
    """A rollout as PPO trains on it: sampled and scored by the callback, then given its old and reference
    log-probs and advantages (values, returns) by PPO's ``on_rollout``."""
    r = bind(callback or _callback(), module).sample(module, _batch(module, synthetic_dir))
    module.on_rollout([r], "train")
    (taken,) = module._rollouts.pop("train")
    return taken


@torch.no_grad()
def _perturb(model, std=0.05):
    torch.manual_seed(7)
    for p in model.parameters():
        if p.ndim >= 2:
            p.add_(torch.randn_like(p) * std)


# ---------------------------------------------------------------- the critic
def test_critic_values_start_as_the_reward_models_scores_of_the_partial_completions(rm_folder, synthetic_dir):
    """V(s_t), the value of the state before completion token t, is at initialisation the reward model's
    score of the prompt followed by the first t completion tokens (read at their last token)."""
    module = _module(rm_folder)
    callback = bind(_callback(num_generations=2, min_new_tokens=NEW), module)
    r = callback.sample(module, _batch(module, synthetic_dir, n=1))
    rm = RewardModel.from_pretrained(str(rm_folder))
    values = module.values(r, [0, 1]).detach()  # (2, N)
    seq = r.sequences([0, 1])
    P = seq["prompt_length"]
    for row in range(2):
        for t in range(NEW):
            ids = seq["input_ids"][row : row + 1, : P + t]
            mask = seq["attention_mask"][row : row + 1, : P + t]
            vision = {k: v[row : row + 1, : P + t] if torch.is_tensor(v) and v.shape[:2] == seq["input_ids"].shape
                      else v for k, v in seq["vision"].items()}  # fmt: skip
            with torch.no_grad():
                score = rm.scores(ids, mask, vision)
            assert torch.allclose(values[row, t], score[0], atol=1e-5), (row, t)
    assert values.std() > 0  # a random head on distinct states: the comparison is not trivially 0 == 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_critic_values_with_the_shared_prefix_equal_per_sequence_values(checkpointing, rm_folder, synthetic_dir):
    """The critic reads its hidden states from one forward of each prompt (``loop.shared_prefix``): the
    values and the critic's gradients of per-sequence forwards (2 prompts of different lengths), also with
    the critic under activation checkpointing (its backward replays the layers, cache included)."""
    torch.manual_seed(0)
    module = PPO(BackboneConfig(tiny=TinyVLM(family="qwen2_vl")),
                 critic=BackboneConfig(model_name_or_path=str(rm_folder), gradient_checkpointing=checkpointing))  # fmt: skip
    module.configure_model()
    r = bind(_callback(), module).sample(module, _batch(module, synthetic_dir, n=2))
    assert r.prompt_mask.sum(1).unique().numel() == 2
    params = [p for p in module.critic.parameters() if p.requires_grad]
    layer = next(m for m in module.critic.modules() if type(m).__name__.endswith("DecoderLayer"))
    calls = []
    layer.self_attn.register_forward_pre_hook(lambda *args: calls.append(1))  # inside the checkpointed forward
    module.critic.train()
    results = []
    for on in (True, False):
        module.settings.shared_prefix = on
        values = module.values(r, [0, 1])  # (2B, N)
        results.append(
            (values, torch.autograd.grad((values * r.completion_mask[r.rows_of([0, 1])]).sum(), params))
        )
    assert len(calls) == (6 if checkpointing else 3)  # two passes + one; checkpointing replays each
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, atol=1e-5) and a.std() > 0
    for x, y in zip(ga, gb, strict=True):
        assert (x - y).abs().max() <= 1e-5 + 1e-4 * y.abs().max()


def test_critic_lm_head_is_frozen_and_critic_lr_has_its_own_group(rm_folder):
    module = _module(rm_folder, lr=1e-5, critic_lr=1e-3)
    critic = module.critic.backbone.model
    assert not critic.get_output_embeddings().weight.requires_grad
    assert not any(p.requires_grad for p in module.critic.backbone.vision_tower.parameters())
    assert module.critic.head.weight.requires_grad
    critic_ids = {id(p) for p in module.critic.parameters()}
    groups = module.param_groups()
    for g in groups:
        is_critic = {id(p) in critic_ids for p in g["params"]}
        assert len(is_critic) == 1  # no group mixes the two
        assert g.get("lr", 1e-5) == (1e-3 if is_critic.pop() else 1e-5)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)


# ---------------------------------------------------------------- advantages
def test_advantages_are_whitened_gae_of_the_kl_shaped_rewards(rm_folder, synthetic_dir):
    """Recomputed by hand in float64, token by token, from the rollout's log-probs and plain critic values."""
    kw = dict(kl_coef=0.2, kl="k3", gamma=0.9, lam=0.8, missing_eos_penalty=0.5)
    module = _module(rm_folder, **kw)
    _perturb(module.backbone.model)  # the policy now differs from its reference copy
    r = _rollout(module, synthetic_dir)
    old, ref = r.old_logps.double(), r.ref_logps.double()
    mask = r.completion_mask.double()
    assert (old - ref).abs().max() > 1e-3
    values = torch.zeros_like(mask)
    for row in range(B * G):  # one sample per forward instead of the rollout's chunks
        prompt, sample = divmod(row, G)
        values[row] = module.values(r, [sample]).detach()[prompt].double()
    values *= mask
    assert torch.allclose(r.extra["values"].double(), values, atol=1e-5)
    scores = r.rewards.double() - 0.5 * r.truncated.double()
    expected = torch.zeros_like(mask)
    returns = torch.zeros_like(mask)
    for row in range(B * G):
        n = int(mask[row].sum())
        rewards = []
        for t in range(n):
            d = ref[row, t] - old[row, t]
            rewards.append(-0.2 * (math.exp(d) - d - 1) + (scores[row] if t == n - 1 else 0.0))
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[row, t + 1] if t + 1 < n else 0.0
            running = rewards[t] + 0.9 * next_value - values[row, t] + 0.9 * 0.8 * running
            expected[row, t] = running
            returns[row, t] = running + values[row, t]
    flat = expected[mask.bool()]
    whitened = torch.zeros_like(mask)
    whitened[mask.bool()] = (flat - flat.mean()) / flat.std()
    assert torch.allclose(r.extra["returns"].double(), returns, atol=1e-5)
    assert torch.allclose(r.advantages.double(), whitened, atol=1e-4)
    assert r.advantages.shape == r.completion_ids.shape


def test_missing_eos_penalty_lowers_the_score_of_truncated_completions(rm_folder, synthetic_dir):
    """With EOS held back, every completion is truncated and its score drops by the penalty."""
    cb = _callback(min_new_tokens=NEW)
    plain = _rollout(_module(rm_folder, kl_coef=0.0), synthetic_dir, cb)
    penalised = _rollout(_module(rm_folder, kl_coef=0.0, missing_eos_penalty=2.0), synthetic_dir, cb)
    assert plain.truncated.all() and torch.equal(plain.completion_ids, penalised.completion_ids)
    diff = penalised.extra["returns"] - plain.extra["returns"]  # (B*G, N)
    # The last token's reward drops by 2; GAE (gamma 1, lam 0.95) passes it back decayed by lam per token.
    expected = -2.0 * 0.95 ** torch.arange(NEW - 1, -1, -1, dtype=torch.float32)
    assert torch.allclose(diff, expected.expand_as(diff), atol=1e-5)


@pytest.mark.parametrize("ratio, error", [(0.9, -0.1), (10.0, 0.2)], ids=["in-range", "clipped"])
def test_adaptive_kl_coef_follows_the_controller_and_is_checkpointed(ratio, error, rm_folder, synthetic_dir):
    """Ziegler et al.'s controller: the rollout's KL is ``ratio`` x the target, so the proportional error
    is ``ratio - 1`` clipped to +-0.2, and the coefficient moves by ``1 + error * samples / horizon``."""

    def rollout(**kw):
        module = _module(rm_folder, **kw)
        _perturb(module.backbone.model)
        return module, _rollout(module, synthetic_dir)

    _, fixed = rollout(kl_coef=0.1)
    mask = fixed.completion_mask.double()
    kl = float(((fixed.old_logps.double() - fixed.ref_logps.double()) * mask).sum(1).mean())  # k1, by hand
    assert kl > 0.01
    horizon = B * G  # one rollout moves the coefficient by the whole (clipped) error
    module, adaptive = rollout(kl_coef=0.1, kl_target=kl / ratio, kl_horizon=horizon)
    assert module.kl_coef == pytest.approx(0.1 * (1 + error), rel=1e-4)
    # This rollout's rewards used the coefficient from before the update, not the updated one.
    assert torch.allclose(adaptive.extra["returns"], fixed.extra["returns"], atol=1e-6)
    _, updated = rollout(kl_coef=module.kl_coef)
    assert not torch.allclose(updated.extra["returns"], fixed.extra["returns"], atol=1e-6)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    restored = _module(rm_folder, kl_coef=0.1, kl_target=kl / ratio, kl_horizon=horizon)
    restored.on_load_checkpoint(checkpoint)
    assert restored.kl_coef == module.kl_coef != 0.1


# ---------------------------------------------------------------- update
def test_policy_loss_is_ppo_losses_on_the_critics_values(rm_folder, synthetic_dir):
    module = _module(rm_folder, cliprange=0.1, cliprange_value=0.05, vf_coef=0.3)
    r = _rollout(module, synthetic_dir)
    samples = [1]
    rows = r.rows_of(samples)
    logps, _, _ = loop.forward(module, r, samples)
    mask = r.completion_mask[rows].float()
    old = r.old_logps[rows] - 0.3 * mask  # ratios away from 1, so the clipping matters
    sampler = old + torch.linspace(-1.0, 0.5, mask.shape[1])  # an engine's log-probs: weights e^1 .. e^-0.5
    chunk = Chunk(logps=logps, old_logps=old, ref_logps=r.ref_logps[rows], advantages=r.advantages[rows],
                  mask=mask, totals=None, rollout=r, samples=samples, rows=rows, sampler_logps=sampler,
                  tis_cap=2.0)  # fmt: skip
    loss, metrics = module.policy_loss(chunk)
    seq = r.sequences(samples)
    values = module.critic.values(seq)  # the image encoded anew: no shared features
    ref_loss, ref_metrics = ppo_losses(logps, old, r.advantages[rows], values, r.extra["values"][rows],
                                       r.extra["returns"][rows], mask, 0.1, 0.05, 0.3, sampler_logps=sampler,
                                       tis_cap=2.0)  # fmt: skip
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert metrics["policy/clipfrac"] > 0
    assert 0 < float(metrics["rollout/tis_clipped"]) == float(ref_metrics["rollout/tis_clipped"]) < 1
    loss.backward()
    assert module.critic.head.weight.grad is not None and module.critic.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, dropout=0.0)], ids=["full", "lora"])
def test_training_moves_policy_and_critic_only_and_keeps_the_reference(lora, rm_folder, synthetic_dir):
    module = _module(rm_folder, lora=lora, lr=1e-3, critic_lr=1e-3, loop={"num_iterations": 2})
    bb = module.backbone
    fixed = _rollout(module, synthetic_dir)
    with bb.reference() as ref:
        ref_before = loop.logps(module, fixed, model=ref)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    ref_weights = {n: p.detach().clone() for n, p in bb._reference.named_parameters()} if lora is None else {}
    spy = Spy()
    trainer = _fit(module, synthetic_dir, [_callback(), spy], steps=2)  # 1 rollout, 2 PPO epochs
    assert (
        len(spy.rollouts) == 1
        and spy.rollouts[0][0].advantages.shape == spy.rollouts[0][0].completion_ids.shape
    )
    frozen_towers = {id(p) for p in bb.vision_tower.parameters()} | {
        id(p) for p in module.critic.backbone.vision_tower.parameters()
    }
    moved = {"policy": False, "critic": False}
    for name, p in module.named_parameters():
        assert (not torch.equal(before[name], p)) == p.requires_grad, name
        assert not (p.requires_grad and id(p) in frozen_towers), name
        if p.requires_grad:
            moved["critic" if name.startswith("critic.") else "policy"] = True
    assert moved == {"policy": True, "critic": True}
    if lora is None:
        assert all(torch.equal(p, ref_weights[n]) for n, p in bb._reference.named_parameters())
    with bb.reference() as ref:
        assert torch.allclose(loop.logps(module, fixed, model=ref), ref_before, atol=1e-6)
    m = trainer.callback_metrics
    for key in ("objective/kl", "objective/scores", "objective/non_score_reward", "objective/rlhf_reward",
                "policy/entropy", "policy/clipfrac", "policy/approxkl", "value/loss", "value/clipfrac",
                "value/explained_variance", "train/loss"):  # fmt: skip
        assert key in m and math.isfinite(float(m[key])), key
    assert float(m["objective/scores"]) == pytest.approx(float(spy.rollouts[0][0].rewards.mean()), abs=1e-6)


def test_critic_warmup_rollouts_leave_the_policy_fixed(rm_folder, synthetic_dir):
    module = _module(rm_folder, lr=1e-3, critic_lr=1e-3, loop={"num_iterations": 1}, critic_warmup_rollouts=1)
    snapshots = []

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append(
                {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
            )

    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    _fit(module, synthetic_dir, [_callback(), Snap()], steps=2)  # two rollouts, one step each
    first, second = snapshots
    policy = [n for n in before if not n.startswith("critic.")]
    critic = [n for n in before if n.startswith("critic.")]
    assert all(torch.equal(first[n], before[n]) for n in policy)  # rollout 1: the critic only
    assert any(not torch.equal(first[n], before[n]) for n in critic)
    assert any(not torch.equal(second[n], first[n]) for n in policy)  # rollout 2: both


def test_one_sample_per_prompt_and_no_reference_without_kl(rm_folder, synthetic_dir):
    module = _module(rm_folder, kl_coef=0.0, loop={"num_iterations": 1})
    assert module.backbone._reference is None
    assert module.needs() == RolloutNeeds(reference=False, old_policy=True, min_group_size=1)
    spy = Spy()
    trainer = _fit(module, synthetic_dir, [_callback(num_generations=1), spy], steps=1)
    ((r,),) = spy.rollouts
    assert r.ref_logps is None and r.completion_ids.shape[0] == B
    assert r.old_logps is not None  # on-policy, but the KL-shaped reward is taken under the sampler
    assert math.isfinite(float(trainer.callback_metrics["policy/clipfrac"]))  # the update ran


def test_held_out_validation_logs_greedy_and_sampled_scores_and_kl(rm_folder, synthetic_dir):
    module = _module(rm_folder)
    _perturb(module.backbone.model)

    def validate(**kw):
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1,
                            callbacks=[_callback(**kw)])  # fmt: skip
        (metrics,) = trainer.validate(module, _dm(synthetic_dir), verbose=False)
        return metrics

    greedy_only = validate()
    assert "val/reward" in greedy_only and not {"val/score", "val/kl"} & set(
        greedy_only
    )  # no held-out samples
    first, second = validate(eval_sampling=True), validate(eval_sampling=True)
    assert {"val/reward", "val/score", "val/kl"} <= set(first)
    assert first["val/reward"] == greedy_only["val/reward"]
    assert first == second  # the held-out draw is seeded: every check sees the same samples
    assert first["val/kl"] > 0  # the perturbed policy differs from its reference


# ---------------------------------------------------------------- bad input
def test_bad_settings_fail_clearly(rm_folder, synthetic_dir, tmp_path):
    sft = ensure_tiny_vlm(TinyVLM(family="qwen2_vl"))
    with pytest.raises(FileNotFoundError, match=r"no reward_head.safetensors \(not a reward model export\)"):
        PPO(BackboneConfig(tiny=TinyVLM()), critic=BackboneConfig(model_name_or_path=str(sft)))
    with pytest.raises(ValueError, match="critic starts from a reward model export"):
        PPO(BackboneConfig(tiny=TinyVLM()), critic=BackboneConfig(tiny=TinyVLM()))
    with pytest.raises(ValueError, match="is a qwen2_vl model but the policy is llava"):
        PPO(
            BackboneConfig(tiny=TinyVLM(family="llava")),
            critic=BackboneConfig(model_name_or_path=str(rm_folder)),
        )
    with pytest.raises(ValueError, match="its tokenizer differs from the policy's"):
        PPO(
            BackboneConfig(tiny=TinyVLM(vocab_size=400)),
            critic=BackboneConfig(model_name_or_path=str(rm_folder)),
        )
    with pytest.raises(ValueError, match="kl_target needs kl_target > 0"):
        _module(rm_folder, kl_target=0.0)
    with pytest.raises(ValueError, match="model.kl must be k1 or k3"):
        _module(rm_folder, kl="k2")
    with pytest.raises(ValueError, match="num_generations must be at least 1"):
        RolloutCallback(num_generations=0)
    with pytest.raises(
        ValueError, match=r"rollout.dynamic_sampling drops groups .*: PPO learns from every sample"
    ):
        _fit(_module(rm_folder), synthetic_dir, [_callback(dynamic_sampling=True)], steps=1)
    with pytest.raises(
        ValueError, match=r"rollout.num_generations \(2\) must be divisible by model.loop.mini_batches"
    ):
        _fit(_module(rm_folder, loop={"mini_batches": 4}), synthetic_dir, [_callback()], steps=1)
    with pytest.raises(RuntimeError, match="PPO got no rollout for this train batch"):
        _fit(_module(rm_folder), synthetic_dir, [], steps=1)
