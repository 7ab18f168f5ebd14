"""Tiny LLaVA-style model (CLIP vision tower, projector, Llama decoder): a non-Qwen family whose single
``<image>`` placeholder expands to a run of image tokens."""

from __future__ import annotations

import math

from lightning_vlm.model.tiny.common import (
    CHAT_TEMPLATE,
    QWEN_IMAGE,
    text_sizes,
    tower_sizes,
    train_tokenizer,
)


def build(spec):
    """(config, processor) of the tiny ``llava`` family."""
    import transformers
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tokenizer = train_tokenizer(spec.vocab_size, extra=("<image>",))
    side = math.isqrt(spec.max_pixels) // 14 * 14  # square images, whole patches
    template = CHAT_TEMPLATE.replace(QWEN_IMAGE, "<image>")
    tokenizer.chat_template = template
    config = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **tower_sizes(spec, side, 14)),
        text_config=dict(model_type="llama", **text_sizes(spec, tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS position that "default" drops
        chat_template=template,
    )
    return config, processor
