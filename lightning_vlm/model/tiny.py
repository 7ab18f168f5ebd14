"""Tiny random-initialised VLMs, saved as ordinary Hugging Face folders.

No model hub is needed: the family's real config and model classes are instantiated at toy
sizes, a byte-level BPE tokenizer is trained in-process on the synthetic-data corpus, and the
family's chat template and (PIL) image processor complete the folder. The backbone then loads
the folder exactly like a downloaded checkpoint, so tests exercise the real loading path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

Family = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava"]

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

# Part of the cache key: bumped when the saved folder changes, so folders cached by older code are rebuilt
# (2: the processor config holds the video processor that stock AutoProcessor needs).
FOLDER_VERSION = 2


@dataclass
class TinyVLM:
    """A toy-sized member of a real VLM family, built offline.

    Args:
        family: Which Hugging Face model family to instantiate (``llava`` is a CLIP + Llama
            LLaVA-style model, the non-Qwen family covered by the tests).
        hidden_size: Width of the language model.
        num_layers: Decoder layers of the language model.
        num_heads: Attention heads of the language model (2 key/value heads).
        vision_depth: Blocks of the vision tower.
        vision_hidden_size: Width of the vision tower.
        vocab_size: Target size of the in-process BPE vocabulary.
        num_experts: Experts per MoE layer (qwen3_vl_moe only).
        min_pixels: Smallest image area the image processor resizes to.
        max_pixels: Largest image area the image processor resizes to.
        seed: Seed of the random initialisation.
        tie_word_embeddings: Share the LM head's weight with the input embeddings (as Qwen2-VL-2B
            does); Qwen families only.
    """

    family: Family = "qwen2_vl"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vocab_size: int = 600
    num_experts: int = 4
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    seed: int = 0
    tie_word_embeddings: bool = False

    def fingerprint(self) -> str:
        spec = {**asdict(self), "folder_version": FOLDER_VERSION}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _train_tokenizer(vocab_size: int, extra: tuple[str, ...] = ()):
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
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def _text_sizes(spec: TinyVLM, tokenizer) -> dict:
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


def _config(spec: TinyVLM, tokenizer):
    import transformers

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = spec.hidden_size // spec.num_heads
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # (t, h, w) sections sum to half
    text = _text_sizes(spec, tokenizer)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
    vision = dict(depth=spec.vision_depth, num_heads=2, hidden_size=spec.hidden_size)
    width = spec.vision_hidden_size  # sized: the Qwen2.5-VL and Qwen3-VL towers
    sized = dict(hidden_size=width, intermediate_size=2 * width, out_hidden_size=spec.hidden_size)
    if spec.family == "qwen2_vl":
        cls = transformers.Qwen2VLConfig
        vision.update(embed_dim=width, mlp_ratio=2)
    elif spec.family == "qwen2_5_vl":
        cls = transformers.Qwen2_5_VLConfig
        vision.update(sized, fullatt_block_indexes=[spec.vision_depth - 1], window_size=56)
    else:
        moe = spec.family == "qwen3_vl_moe"
        cls = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(sized, num_position_embeddings=64, deepstack_visual_indexes=[0], patch_size=16)
        if moe:
            text.update(num_experts=spec.num_experts, num_experts_per_tok=2)
            text.update(moe_intermediate_size=spec.hidden_size, decoder_sparse_step=1)
    return cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def _llava(spec: TinyVLM, tokenizer):
    """A LLaVA-style model (CLIP vision tower, projector, Llama decoder): a non-Qwen family whose
    single ``<image>`` placeholder expands to a run of image tokens."""
    import math

    import transformers
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    side = math.isqrt(spec.max_pixels) // 14 * 14  # square images, whole patches
    template = CHAT_TEMPLATE.replace(QWEN_IMAGE, "<image>")
    tokenizer.chat_template = template
    config = transformers.LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=spec.vision_hidden_size,
            intermediate_size=2 * spec.vision_hidden_size,
            num_hidden_layers=spec.vision_depth,
            num_attention_heads=2,
            image_size=side,
            patch_size=14,
        ),
        text_config=dict(model_type="llama", **_text_sizes(spec, tokenizer)),
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


def save_tiny_vlm(spec: TinyVLM, out_dir: str | Path) -> Path:
    """Build the tiny model described by ``spec`` and save it (weights, tokenizer, processor) to ``out_dir``."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from lightning_vlm.model.processing import image_only_processor, save_processor

    out_dir = Path(out_dir)
    if spec.family == "llava":
        tokenizer = _train_tokenizer(spec.vocab_size, extra=("<image>",))
        config, processor = _llava(spec, tokenizer)
    else:
        tokenizer = _train_tokenizer(spec.vocab_size)
        config = _config(spec, tokenizer)
        patch = 16 if spec.family.startswith("qwen3") else 14
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=patch,
            merge_size=2,
            temporal_patch_size=2,
            min_pixels=spec.min_pixels,
            max_pixels=spec.max_pixels,
        )
        stock = PROCESSOR_MAPPING_NAMES[spec.family]  # the family's stock processor, minus its video half
        processor = image_only_processor(stock)(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(out_dir)
    save_processor(processor, out_dir)
    (out_dir / "tiny_vlm.json").write_text(json.dumps(asdict(spec), indent=2))
    return out_dir


def ensure_tiny_vlm(spec: TinyVLM, cache_dir: str | Path | None = None) -> Path:
    """Return the folder of ``spec``, building it once into the cache (atomically) if missing."""
    root = Path(cache_dir or os.environ.get("LIGHTNING_VLM_CACHE", Path.home() / ".cache" / "lightning_vlm"))
    target = root / "tiny" / f"{spec.family}-{spec.fingerprint()}"
    if (target / "tiny_vlm.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        save_tiny_vlm(spec, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: use its copy
            if not (target / "tiny_vlm.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
