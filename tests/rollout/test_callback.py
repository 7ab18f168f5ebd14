"""The RolloutCallback: completion masks, reward errors, per-prompt seeds, dynamic sampling, held-out
rollouts, and the hand-over to the objective."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_vlm import BackboneConfig, TinyVLM
from lightning_vlm.data import PromptDataModule
from lightning_vlm.objectives import GRPO, SFT
from lightning_vlm.objectives.online import loop
from lightning_vlm.rollout.rollout import completion_mask
from tests.helpers.online import (
    NEW,
    B,
    G,
    Spy,
    bind,
    build,
    count_calls,
    even_prompts,
    fit,
    prompt_batch,
    prompt_dm,
    rollout_callback,
    sharpen,
    token_reward,
)


# ---------------------------------------------------------------- masks
def test_completion_mask_edge_cases():
    eos = 7
    ids = torch.tensor([
        [7, 0, 0, 0],  # EOS first
        [1, 2, 3, 7],  # EOS last
        [1, 2, 3, 4],  # no EOS: truncated
        [1, 7, 2, 7],  # two EOS: up to the first
    ])  # fmt: skip
    mask, truncated = completion_mask(ids, eos)
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]
    assert mask.dtype == torch.long


# ---------------------------------------------------------------- bad input
def _broken(prompts, completions, **row):
    raise ValueError("boom")


def _nan_at_5(prompts, completions, **row):
    return [math.nan if i == 5 else 0.0 for i in range(len(completions))]


@pytest.fixture(scope="module")
def plain_grpo():
    return build(GRPO)


def test_reward_errors_name_the_function(plain_grpo, synthetic_dir):
    batch = prompt_batch(prompt_dm(plain_grpo.backbone.processor, synthetic_dir))
    with pytest.raises(RuntimeError, match=r"reward function _broken raised.*boom"):
        bind(rollout_callback(rewards=(_broken,)), plain_grpo).sample(plain_grpo, batch)
    with pytest.raises(RuntimeError, match=r"reward function _nan_at_5 returned nan for sample 5"):
        bind(rollout_callback(rewards=(_nan_at_5,)), plain_grpo).sample(plain_grpo, batch)


def test_reward_that_raises_names_the_sample(plain_grpo, synthetic_dir):
    def numeric(prompts, completions, answer, **row):
        return [float(a) for a in answer]  # raises on the first non-numeric answer

    batch = prompt_batch(prompt_dm(plain_grpo.backbone.processor, synthetic_dir))
    answers = [a for a in batch["columns"]["answer"] for _ in range(G)]
    first_bad = next(i for i, a in enumerate(answers) if not a.replace(".", "").isdigit())
    with pytest.raises(
        RuntimeError,
        match=rf"numeric raised on this batch of {len(answers)} completions, at sample {first_bad} ",
    ):
        bind(rollout_callback(rewards=(numeric,)), plain_grpo).sample(plain_grpo, batch)


def test_a_module_without_the_hand_over_hook_is_refused(synthetic_dir):
    module = SFT(BackboneConfig(tiny=TinyVLM()))
    with pytest.raises(TypeError, match="SFT is not an online objective .*no on_rollout hook"):
        fit(module, synthetic_dir, [rollout_callback()])
    with pytest.raises(ValueError, match="num_generations must be at least 1"):
        rollout_callback(num_generations=0)
    with pytest.raises(ValueError, match="2 reward functions but 1 reward_weights"):
        rollout_callback(rewards=(token_reward, even_prompts), reward_weights=[1.0])


# ---------------------------------------------------------------- per-prompt seeds
def test_per_prompt_seeds_make_a_prompts_samples_independent_of_its_batch(synthetic_dir):
    module = build(GRPO)
    sharpen(module.backbone.model, 2.0)  # less uniform logits: distinct samples per prompt
    dm = prompt_dm(module.backbone.processor, synthetic_dir)
    callback = bind(rollout_callback(per_prompt_seeds=True, temperature=0.7, top_k=50), module)
    both = callback.sample(module, prompt_batch(dm, n=2))  # rows 0 and 1
    alone = callback.sample(module, prompt_batch(dm, n=1, start=1))  # row 1 in a batch of its own
    assert torch.equal(alone.completion_ids, both.completion_ids[G:])  # row 1's G samples, unchanged
    assert not torch.equal(both.completion_ids[:G], both.completion_ids[G:])
    callback.rollouts += 1  # the next rollout draws anew
    again = callback.sample(module, prompt_batch(dm, n=1, start=1))
    assert not torch.equal(again.completion_ids, alone.completion_ids)


# ---------------------------------------------------------------- dynamic sampling
class FirstBatchHalfFlat:
    """First call (the step's batch): prompt 1's group is flat. Later calls (refills): all informative."""

    __name__ = "first_batch_half_flat"

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, completions, completion_ids, group, **row):
        self.calls += 1
        varied = token_reward(prompts, completions, completion_ids)
        return [1.0 if (self.calls == 1 and g == 1) else v for v, g in zip(varied, group, strict=True)]


def test_dynamic_sampling_keeps_exactly_b_informative_groups(synthetic_dir):
    module = build(GRPO, lr=1e-3)
    reward = FirstBatchHalfFlat()
    calls = count_calls(module)
    spy = Spy()
    trainer = fit(module, synthetic_dir, [rollout_callback(rewards=(reward,), dynamic_sampling=True), spy])
    (rollouts,) = spy.rollouts
    assert len(rollouts) == 2 and reward.calls == 2  # the batch (1 informative group) and one refill (2)
    assert all(r.dynamic_sampling for r in rollouts)
    spread = [(r.rewards.view(-1, G).std(1) > 0).tolist() for r in rollouts]
    assert spread == [[True, False], [True, True]]
    groups = [r.keep.view(-1, G) for r in rollouts]
    assert all((g == g[:, :1]).all() for g in groups)  # whole groups are kept or dropped
    kept = [g[:, 0].tolist() for g in groups]
    assert kept == [[True, False], [True, False]]  # flat group dropped; one informative group over budget
    m = trainer.callback_metrics
    assert m["rollout/refills"] == 1 and m["rollout/kept_groups"] == B
    # one training forward per rollout: the B prompts once, then their B * G completions (shared prefix)
    assert [c[0] for c in calls["lm"] if c[2]] == [B, B * G] * 2
    # Dropped samples carry no gradient, even the over-budget group whose advantages are not zero.
    dropped = rollouts[1].advantages.view(-1, G)[1]
    assert dropped.abs().sum() > 0
    params = [p for p in module.parameters() if p.requires_grad]

    def grads():
        step = loop.chunks(module, G)[0]
        totals = loop.step_totals(module, rollouts, step)
        losses = [loop.chunk_loss(module, r, s, totals, 2)[0] for r in rollouts for s in step]
        return torch.autograd.grad(sum(x for x in losses if x is not None), params, allow_unused=True)

    def same(a, b):
        return all(
            (x is None and y is None) or torch.allclose(x, y, atol=1e-7) for x, y in zip(a, b, strict=True)
        )

    base = grads()
    for r in rollouts:
        r.advantages = torch.where(r.keep, r.advantages, torch.randn_like(r.advantages) * 10)
    assert same(base, grads())
    for r in rollouts:
        r.advantages = torch.where(r.keep, r.advantages, 0.0)
    assert same(base, grads())
    rollouts[1].advantages[0] += 1.0  # a kept sample: control
    assert not same(base, grads())


# ---------------------------------------------------------------- held-out rollouts
def test_validation_scores_greedy_answers(grpo_run, synthetic_dir):
    module = grpo_run["module"]
    bb = module.backbone
    eos, pad = bb.tokenizer.eos_token_id, bb.tokenizer.pad_token_id
    generate = bb.generate

    def ending_early(*args, **kw):  # prompt 0's answer ends after two tokens, as a trained model's might
        out = generate(*args, **kw).clone()
        out[0, 1], out[0, 2:] = eos, pad
        return out

    bb.generate = ending_early
    dm = PromptDataModule(train=str(synthetic_dir / "prompt_train.jsonl"),
                          val=str(synthetic_dir / "prompt_val.jsonl"), batch_size=B)  # fmt: skip
    validator = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1,
                          callbacks=[grpo_run["callback"]])  # fmt: skip
    try:
        (metrics,) = validator.validate(module, dm, verbose=False)
    finally:
        del bb.generate
    val = dm.val_dataloader()
    batch = next(iter(val))
    ids = ending_early(batch["input_ids"], batch["attention_mask"], batch["vision"], max_new_tokens=NEW)
    mask, _ = completion_mask(ids, eos)
    kept = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    assert [len(k) for k in kept] == [2, NEW]
    texts = bb.decode(ids)
    tokens = token_reward(batch["prompts"], texts, kept)
    lengths = even_prompts(batch["prompts"], texts, kept, group=[0, 1])
    assert lengths == [2.0, None]  # the answer's tokens up to its EOS, as in the rollout
    assert metrics["val/rewards/token_reward"] == pytest.approx(sum(tokens) / B)
    assert metrics["val/rewards/even_prompts"] == pytest.approx(lengths[0])
    assert metrics["val/reward"] == pytest.approx((tokens[0] + tokens[1] + lengths[0]) / B)


def test_held_out_batches_get_a_greedy_rollout_and_optionally_a_seeded_sampled_one(synthetic_dir):
    """Each held-out batch hands the objective a greedy rollout of ``eval_max_new_tokens``; with
    ``eval_sampling`` also G samples per prompt, seeded by the batch index: every check draws the same."""
    module = build(GRPO)
    sharpen(module.backbone.model, 2.0)
    seen: list[tuple[str, list]] = []
    hand_over = module.on_rollout

    def on_rollout(rollouts, stage):
        seen.append((stage, rollouts))
        hand_over(rollouts, stage)

    module.on_rollout = on_rollout
    dm = PromptDataModule(train=str(synthetic_dir / "prompt_train.jsonl"),
                          val=str(synthetic_dir / "prompt_val.jsonl"), batch_size=B, eval_batch_size=B)  # fmt: skip
    for eval_sampling in (False, True, True):
        callback = rollout_callback(eval_max_new_tokens=2, eval_sampling=eval_sampling)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1,
                            callbacks=[callback])  # fmt: skip
        trainer.validate(module, dm, verbose=False)
    assert [stage for stage, _ in seen] == ["val"] * 3
    (greedy,), (greedy_too, sampled), (_, sampled_again) = (rollouts for _, rollouts in seen)
    for r in (greedy, greedy_too):
        assert r.group_size == 1 and not r.sampling.do_sample and r.completion_ids.shape == (B, 2)
        assert r.temperature == 1.0
    assert torch.equal(greedy.completion_ids, greedy_too.completion_ids)
    assert sampled.group_size == G and sampled.sampling.do_sample and sampled.max_new_tokens == NEW
    assert torch.equal(sampled.completion_ids, sampled_again.completion_ids)  # seeded by the batch index
    assert module._rollouts == {}  # every held-out rollout was consumed by its step


def test_rewards_get_the_rows_own_prompts_without_the_system_prompt(synthetic_dir):
    """The policy's prompt carries data.system_prompt; the reward functions (a reward model among them,
    trained without it) get each row's own prompt."""
    module = build(GRPO)
    seen = []

    def spy(prompts, completions, **row):
        seen.extend(prompts)
        return [0.0] * len(completions)

    dm = prompt_dm(module.backbone.processor, synthetic_dir, system_prompt="Answer in <answer></answer> tags.")
    batch = dm._collator("train")([dm.datasets["train"][i] for i in range(B)])
    assert batch["prompts"][0][0]["role"] == "system"  # what the policy reads
    bind(rollout_callback(rewards=(spy,)), module).sample(module, batch)
    assert len(seen) == B * G and seen[0] == seen[G - 1] == batch["row_prompts"][0]
    assert all(m["role"] != "system" for p in seen for m in p)
