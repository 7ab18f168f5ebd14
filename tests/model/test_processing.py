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


@pytest.mark.skipif(is_torchvision_available(), reason="with torchvision the processor is the stock one")
def test_an_image_only_processor_without_a_known_video_processor_warns(monkeypatch, tmp_path):
    processor = VLMBackbone(BackboneConfig(tiny=TinyVLM())).processor
    monkeypatch.delitem(processing._VIDEO_PROCESSOR, "Qwen2VLProcessor")
    with pytest.warns(UserWarning, match=re.escape(str(tmp_path / "processor_config.json"))):
        processing.save_processor(processor, tmp_path)
    cfg = json.loads((tmp_path / "processor_config.json").read_text())
    assert cfg["processor_class"] == "Qwen2VLProcessor" and "video_processor" not in cfg
