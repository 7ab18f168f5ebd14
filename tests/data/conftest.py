"""Fixtures of the data tests: the tiny Qwen2-VL's processor (from its backbone), built once per module."""

from __future__ import annotations

import pytest

from lightning_vlm import BackboneConfig, TinyVLM, VLMBackbone


@pytest.fixture(scope="module")
def backbone():
    return VLMBackbone(BackboneConfig(tiny=TinyVLM(family="qwen2_vl")))


@pytest.fixture(scope="module")
def processor(backbone):
    return backbone.processor
