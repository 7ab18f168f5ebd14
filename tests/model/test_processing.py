"""Saving a processor: an image-only processor of a family without a known video processor still saves,
under its stock name, and says that stock AutoProcessor will not load the folder. (Saved folders loading in
stock transformers, with and without torchvision: tests/test_export.py.)"""

from __future__ import annotations

import json
import re

import pytest
from transformers.utils import is_torchvision_available

from lightning_vlm import BackboneConfig, TinyVLM, VLMBackbone
from lightning_vlm.model import processing
from lightning_vlm.model.tiny import ensure_tiny_vlm


@pytest.mark.skipif(is_torchvision_available(), reason="with torchvision the processor is the stock one")
def test_an_image_only_processor_without_a_known_video_processor_warns(monkeypatch, tmp_path):
    processor = VLMBackbone(BackboneConfig(tiny=TinyVLM())).processor
    monkeypatch.delitem(processing._VIDEO_PROCESSOR, "Qwen2VLProcessor")
    with pytest.warns(UserWarning, match=re.escape(str(tmp_path / "processor_config.json"))):
        processing.save_processor(processor, tmp_path)
    cfg = json.loads((tmp_path / "processor_config.json").read_text())
    assert cfg["processor_class"] == "Qwen2VLProcessor" and "video_processor" not in cfg


def test_an_image_only_processor_keeps_the_stock_processors_own_settings():
    """InternVL's processor takes image_seq_length (context tokens per tile) besides its sub-processors: the
    saved folder holds it, next to the video processor, and the processor loaded from the folder uses it."""
    folder = ensure_tiny_vlm(TinyVLM(family="internvl"))
    tokens = json.loads((folder / "config.json").read_text())["image_seq_length"]
    cfg = json.loads((folder / "processor_config.json").read_text())
    assert cfg["image_seq_length"] == tokens != 256  # not the stock default
    assert cfg["video_processor"]["video_processor_type"] == "InternVLVideoProcessor"
    assert VLMBackbone(BackboneConfig(model_name_or_path=str(folder))).processor.image_seq_length == tokens
