"""The rollout engine interface and the Hugging Face engine's own checks."""

from __future__ import annotations

import pytest
import torch

from lightning_vlm.rollout import GenerationRequest, HFEngine, RolloutEngine, SamplingSettings
from tests.helpers.online import NEW, G, build, prompt_batch, prompt_dm


def test_hf_engine_samples_from_the_trainers_model_and_checks_its_request(synthetic_dir):
    module = build()
    batch = prompt_batch(prompt_dm(module.backbone.processor, synthetic_dir))
    sampled = SamplingSettings(max_new_tokens=NEW)
    prompts = (batch["input_ids"], batch["attention_mask"], batch["vision"])
    request = GenerationRequest(*prompts, G, sampled, seed=3)
    engine = HFEngine()
    assert engine.samples_from_trainer and not RolloutEngine.samples_from_trainer
    with pytest.raises(RuntimeError, match="before setup"):
        engine.generate(request)
    engine.setup(module.backbone)
    out = engine.generate(request)
    assert out.completion_ids.shape[0] == len(batch["rows"]) * G
    assert out.logps is None  # its numerics are the trainer's: no log-probs of its own
    assert torch.equal(engine.generate(request).completion_ids, out.completion_ids)  # seeded: the same draw
    greedy = SamplingSettings(max_new_tokens=NEW, do_sample=False)
    with pytest.raises(ValueError, match="greedy decoding draws one completion per prompt"):
        engine.generate(GenerationRequest(*prompts, G, greedy))


def test_the_vllm_engine_without_vllm_names_the_extra(monkeypatch):
    """Where vLLM is not installed (the main suite's venv), selecting its engine says what to install."""
    import sys

    from lightning_vlm.rollout import VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError, installed or not
    with pytest.raises(ImportError, match=r'pip install "lightning-vlm\[vllm\]"'):
        VLLMEngine().setup(build().backbone)
