"""Saving a processor: an image-only processor of a family without a known video processor still saves,
under its stock name, and says that stock AutoProcessor will not load the folder. (Saved folders loading in
stock transformers, with and without torchvision: tests/test_export.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
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


@pytest.mark.skipif(is_torchvision_available(), reason="with torchvision the processor is the stock one")
def test_an_image_only_processor_saves_and_loads_its_own_settings():
    """LLaVA-OneVision's processor counts an image's tokens from settings of its own (``num_image_tokens``,
    ``vision_aspect_ratio``, ...): its image-only copy writes them to the folder and reads them back, so the
    loaded processor expands images exactly as the one the folder was built from."""
    from PIL import Image

    from lightning_vlm.model.tiny import ensure_tiny_vlm
    from lightning_vlm.model.tiny.llava_next import build

    spec = TinyVLM(family="llava_onevision")
    folder = ensure_tiny_vlm(spec)
    cfg = json.loads((folder / "processor_config.json").read_text())
    assert (cfg["num_image_tokens"], cfg["vision_aspect_ratio"]) == (16, "anyres_max_9")
    loaded = VLMBackbone(BackboneConfig(model_name_or_path=str(folder))).processor
    assert type(loaded).__name__ == "ImageOnlyLlavaOnevisionProcessor"
    built = build(spec)[1]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = built.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.new("RGB", (90, 70), "red")
    ours, theirs = (p(text=[text], images=[image], return_tensors="pt") for p in (built, loaded))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.skipif(is_torchvision_available(), reason="with torchvision the processor is the stock one")
def test_an_image_only_processor_keeps_the_stock_settings_and_renders_chats(tmp_path):
    """SmolVLM's processor has its own setting (image_seq_len: image tokens per tile) and reads its video
    processor's settings in apply_chat_template: the image-only processor saves the setting, loads it back,
    and renders a chat without a video processor."""
    folder = VLMBackbone(BackboneConfig(tiny=TinyVLM(family="smolvlm"))).path
    cfg = json.loads((Path(folder) / "processor_config.json").read_text())
    assert (
        cfg["image_seq_len"] == 4
        and cfg["video_processor"]["video_processor_type"] == "SmolVLMVideoProcessor"
    )
    processor = VLMBackbone(BackboneConfig(model_name_or_path=folder)).processor
    assert type(processor).__name__ == "ImageOnlySmolVLMProcessor" and processor.image_seq_len == 4  # not 169
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    assert (
        processor.apply_chat_template(chat, tokenize=False)
        == "<|im_start|>User:<image>Colour?<end_of_utterance>\n"
    )
    with pytest.raises(ValueError, match="torchvision"):
        processor.video_processor([])


def test_an_image_only_processor_keeps_the_stock_processors_own_settings():
    """InternVL's processor takes image_seq_length (context tokens per tile) besides its sub-processors: the
    saved folder holds it, next to the video processor, and the processor loaded from the folder uses it."""
    folder = ensure_tiny_vlm(TinyVLM(family="internvl"))
    tokens = json.loads((folder / "config.json").read_text())["image_seq_length"]
    cfg = json.loads((folder / "processor_config.json").read_text())
    assert cfg["image_seq_length"] == tokens != 256  # not the stock default
    assert cfg["video_processor"]["video_processor_type"] == "InternVLVideoProcessor"
    assert VLMBackbone(BackboneConfig(model_name_or_path=str(folder))).processor.image_seq_length == tokens
