"""Generation on the trainer's model: no deprecated argument from a prefill, and the per-row seeded sampler.
Prompt once and image tokens never generated are checked for every family in tests/model/test_families.py."""

from __future__ import annotations

import warnings

import torch

from lightning_vlm import BackboneConfig, TinyVLM, VLMBackbone
from tests.helpers.online import NEW, B, G, prompt_batch, prompt_dm


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
