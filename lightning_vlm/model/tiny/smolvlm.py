"""Tiny SmolVLM (SmolVLM2 layout, Idefics3's design): a SigLIP-style vision tower on fixed-size tiles, an image
split into a grid of tiles plus a global view, each tile's features pixel-shuffled (``scale_factor``) into a
Llama decoder; the ``<image>`` placeholder expands to ``<fake_token_around_image><row_i_col_j><image>...`` per
tile and ``<global-img>`` before the global view. Its processor needs the ``num2words`` package."""

from __future__ import annotations

import math

from lightning_vlm.model.tiny.common import text_sizes, tower_sizes, train_tokenizer

TILE, PATCH, SCALE = 56, 14, 2  # a tile of 4x4 patches, pixel-shuffled 2x2: 4 image tokens per tile
GRID = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))  # SmolVLM's 6x6 tile markers
EXTRA = ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *GRID)
# SmolVLM2's chat layout (transformers 5.24's DEFAULT_CHAT_TEMPLATE, videos left out), kept here so that the
# folder does not change with the installed transformers: "User:<image>...<end_of_utterance>\nAssistant:".
TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build(spec):
    """(config, processor) of the tiny ``smolvlm`` family."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from lightning_vlm.model.processing import image_only_processor

    tokenizer = train_tokenizer(spec.vocab_size, extra=EXTRA)
    tokenizer.eos_token = "<end_of_utterance>"
    tokenizer.chat_template = TEMPLATE
    text = text_sizes(spec, tokenizer)
    config = transformers.SmolVLMConfig(
        vision_config=tower_sizes(spec, TILE, PATCH),
        text_config=dict(model_type="llama", **text),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=SCALE,
        pad_token_id=text["pad_token_id"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    image_processor = SmolVLMImageProcessorPil(
        do_image_splitting=True,
        size={"longest_edge": math.isqrt(spec.max_pixels) // TILE * TILE},  # the whole image, in whole tiles
        max_image_size={"longest_edge": TILE},
    )
    stock = PROCESSOR_MAPPING_NAMES["smolvlm"]  # the stock processor, minus its video half
    processor = image_only_processor(stock)(
        image_processor, tokenizer, chat_template=TEMPLATE,
        image_seq_len=(TILE // PATCH) ** 2 // SCALE**2,
    )  # fmt: skip
    return config, processor
