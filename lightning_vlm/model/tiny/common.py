"""What every tiny family shares: the in-process BPE tokenizer and the language model's size."""

from __future__ import annotations

# Chat tokens, then vision tokens; the order fixes their ids.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPECIAL_TOKENS += ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# The Qwen chat layout, images as <|vision_start|><|image_pad|><|vision_end|> in place.
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}" + QWEN_IMAGE + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(vocab_size: int, extra: tuple[str, ...] = (), **settings):
    """A byte-level BPE tokenizer trained on the synthetic corpus, with the Qwen chat tokens plus ``extra``;
    ``settings`` replace or add ``PreTrainedTokenizerFast`` arguments (a family's eos, named special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lightning_vlm.data.synthetic import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [*corpus(), "system", "user", "assistant", "You are a helpful assistant."]
    tok.train_from_iterator(lines * 4, trainer)
    defaults = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **{**defaults, **settings})


def tower_sizes(spec, image_size: int, patch_size: int) -> dict:
    """A ViT-style vision tower's size (CLIP, SigLIP, InternViT, SmolVLM's), shared by the non-Qwen families."""
    return dict(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=2 * spec.vision_hidden_size,
        num_hidden_layers=spec.vision_depth,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )


def text_sizes(spec, tokenizer) -> dict:
    """The language model's size and special tokens, shared by every family."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
