"""Tiny LLaVA-NeXT (CLIP + Mistral) and LLaVA-OneVision (SigLIP + Qwen2): "anyres" models that cut an image
into tiles of the tower's size on a grid picked from ``image_grid_pinpoints`` (plus a resized base view),
pass ``image_sizes`` to undo the padding, and end each row of tile features with a learned ``image_newline``."""

from __future__ import annotations

import math

from lightning_vlm.model.tiny.common import (
    CHAT_TEMPLATE,
    QWEN_IMAGE,
    text_sizes,
    tower_sizes,
    train_tokenizer,
)

# Mistral's [INST] layout, as llava-v1.6-mistral: images in place, each followed by a newline.
MISTRAL_TEMPLATE = (
    "{% for m in messages %}{{ {'user': '[INST] ', 'assistant': ' '}.get(m['role'], '') }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ {'user': ' [/INST]', 'assistant': '</s>'}.get(m['role'], '\n') }}{% endfor %}"
)


def build(spec):
    """(config, processor) of the tiny ``llava_next`` or ``llava_onevision`` family."""
    import transformers
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision import image_processing_pil_llava_onevision as ov

    from lightning_vlm.model.processing import image_only_processor

    patch = 14
    tile = math.isqrt(spec.max_pixels) // (2 * patch) * patch  # the tower's side (56 px: 4 x 4 patches)
    grid = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]  # at most 2 x 2 tiles (112 px)
    onevision = spec.family == "llava_onevision"
    tokenizer = train_tokenizer(spec.vocab_size, extra=("<image>", "<video>" if onevision else "</s>"))
    if onevision:  # Qwen2's chat layout, as llava-onevision-qwen2
        tokenizer.chat_template = CHAT_TEMPLATE.replace(QWEN_IMAGE, "<image>\n")
    else:
        tokenizer.chat_template, tokenizer.eos_token = MISTRAL_TEMPLATE, "</s>"
    vision = tower_sizes(spec, tile, patch)
    common = dict(image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    if onevision:  # SigLIP without its pooling head, as released; all patches ("full", no CLS)
        config = transformers.LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **vision),
            text_config=dict(model_type="qwen2", **text_sizes(spec, tokenizer)),
            video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=[[tile, tile], *grid],
            vision_feature_select_strategy="full",
            **common,
        )
        image_processor = ov.LlavaOnevisionImageProcessorPil(
            size={"height": tile, "width": tile}, image_grid_pinpoints=[[tile, tile], *grid]
        )
        processor = image_only_processor("LlavaOnevisionProcessor")(
            image_processor, tokenizer, chat_template=tokenizer.chat_template,
            num_image_tokens=(tile // patch) ** 2, vision_feature_select_strategy="full",
        )  # fmt: skip
        return config, processor
    config = transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", **vision),
        text_config=dict(model_type="mistral", **text_sizes(spec, tokenizer)),
        image_grid_pinpoints=grid,
        vision_feature_select_strategy="default",
        **common,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=grid
    )
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch, chat_template=MISTRAL_TEMPLATE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # the CLS that "default" drops
    )  # fmt: skip
    return config, processor
