"""The vLLM engine on the other Qwen families (tiny, fp32, CPU): greedy completions equal to the Hugging Face
engine's. A file of its own, run after tests/rollout/test_vllm_engine.py: each family builds an engine,
and vLLM tears down process-wide state when an engine goes, which the module engine there still uses."""

from __future__ import annotations

import pytest
import torch

from lightning_vlm.rollout import VLLMEngine
from tests.helpers.online import prompt_dm
from tests.rollout.test_vllm_engine import batch_of, greedy, hf_greedy, sharp

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_other_qwen_families_give_the_hf_engines_greedy_completions(family, synthetic_dir):
    """Qwen3-VL-MoE and the LLaVA layout are not served: see docs/online_rl.md (vLLM engine, families)."""
    module = sharp(family=family)
    batch = batch_of(prompt_dm(module.backbone.processor, synthetic_dir))
    engine = VLLMEngine(enforce_eager=True, max_model_len=512)
    assert torch.equal(greedy(engine, module, batch), hf_greedy(module, batch))
