"""Generation on the trainer's model: G samples from one prefill (prompt once, vision once), image
tokens never generated, and the per-row seeded sampler."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_vlm import BackboneConfig, TinyVLM, VLMBackbone
from lightning_vlm.model.tiny import FAMILIES
from tests.helpers.online import NEW, B, G, prompt_batch, prompt_dm, sharpen


# ---------------------------------------------------------------- prompt once
@pytest.mark.parametrize("family", FAMILIES)
def test_g_samples_from_one_prefill_equal_plain_greedy(family, synthetic_dir):
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM(family=family)))
    bb.load()
    sharpen(bb.model)
    dm = prompt_dm(bb.processor, synthetic_dir)
    batch = prompt_batch(dm)  # one and two images
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # left padding really happens
    args = (batch["input_ids"], batch["attention_mask"], batch["vision"])
    greedy = bb.generate(*args, max_new_tokens=NEW)  # stock generate, one row per prompt
    assert greedy.shape == (B, NEW)
    assert len({tuple(row) for row in greedy.tolist()}) > 1  # answers depend on the prompt...
    other = {**batch["vision"], "pixel_values": batch["vision"]["pixel_values"].flip(0)}
    assert not torch.equal(bb.generate(args[0], args[1], other, max_new_tokens=NEW), greedy)  # ...and image
    calls: list[int] = []
    hook = bb.vision_tower.register_forward_hook(lambda mod, a, out: calls.append(1))
    try:
        many = bb.generate(*args, max_new_tokens=NEW, do_sample=False, num_return_sequences=G)
        assert len(calls) == 1  # the prefill encodes the images once, not G times
        features = bb.encode_images(batch["vision"])
        calls.clear()
        with_features = bb.generate(*args, max_new_tokens=NEW, num_return_sequences=G, features=features)
        one_with_features = bb.generate(*args, max_new_tokens=NEW, features=features)
        assert calls == []  # the features replace the tower
    finally:
        hook.remove()
    assert torch.equal(many, greedy.repeat_interleave(G, dim=0))
    assert torch.equal(with_features, greedy.repeat_interleave(G, dim=0))
    assert torch.equal(one_with_features, greedy)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "gemma3", "gemma4"])
def test_image_tokens_are_never_generated(family, synthetic_dir):
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM(family=family)))
    bb.load()
    dm = prompt_dm(bb.processor, synthetic_dir)
    batch = prompt_batch(dm)
    config = bb.model.config
    names = ("image_token_id", "vision_start_token_id", "vision_end_token_id", "boi_token_id", "eoi_token_id")
    vision_tokens = [t for t in (getattr(config, n, None) for n in names) if t is not None]
    assert vision_tokens
    plain = bb.tokenizer.convert_tokens_to_ids("red")
    head = bb.model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    for rank, t in enumerate(vision_tokens):  # the vision tokens are the most likely of all...
        bias[t] = 20.0 - rank  # (moderate: Gemma's logit soft-capping at 30 would flatten 1e4s into ties)
    bias[plain] = 10.0  # ...then an ordinary token
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        args = (batch["input_ids"], batch["attention_mask"], batch["vision"])
        with torch.no_grad():
            logits = bb.model(input_ids=args[0], attention_mask=args[1], **args[2]).logits[:, -1]
        assert (logits.argmax(-1) == vision_tokens[0]).all()  # unsuppressed, the image token would win
        greedy = bb.generate(*args, max_new_tokens=3)
        sampled = bb.generate(
            *args, max_new_tokens=3, do_sample=True, num_return_sequences=2, temperature=1e-3
        )
    finally:
        head.bias = None
    for out in (greedy, sampled):
        assert (out == plain).all()


def test_generating_from_a_prefill_uses_no_deprecated_argument(synthetic_dir):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` and warns (FutureWarning) on the old name."""
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM()))
    bb.load()
    batch = prompt_batch(prompt_dm(bb.processor, synthetic_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = bb.generate(batch["input_ids"], batch["attention_mask"], batch["vision"], max_new_tokens=NEW,
                          num_return_sequences=G)  # fmt: skip
    assert out.shape == (B * G, NEW)


# ---------------------------------------------------------------- seeded sampling
def test_seeded_sampling_draws_from_the_softmax():
    """Gumbel-max with per-row generators is an exact draw from softmax(scores): 20,000 rows, one
    seed each, against the probabilities (3 standard errors)."""
    from lightning_vlm.model.generation import SeededSampling

    scores = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    n = 20_000
    draws = SeededSampling(list(range(n)), torch.device("cpu"))(None, scores.expand(n, -1)).argmax(-1)
    freq = torch.bincount(draws, minlength=5).double() / n
    p = scores.double().softmax(-1)
    assert freq[4] == 0  # a filtered token is never drawn
    assert ((freq - p).abs() <= 3 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)
