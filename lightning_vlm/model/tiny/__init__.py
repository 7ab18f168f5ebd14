"""Tiny random-initialised VLMs, saved as ordinary Hugging Face folders.

No model hub is needed: the family's real config and model classes are instantiated at toy
sizes, a byte-level BPE tokenizer is trained in-process on the synthetic-data corpus, and the
family's chat template and (PIL) image processor complete the folder. The backbone then loads
the folder exactly like a downloaded checkpoint, so tests exercise the real loading path.
Each family's builder is ``build(spec) -> (config, processor)`` in the module named by ``BUILDERS``
(and, where needed, ``init(model)`` to adjust the random weights).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

Family = Literal[
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava",
    "qwen3_5", "qwen3_5_moe",
    "llava_next", "llava_onevision",
    "smolvlm",
    "internvl", "glm4v",
    "gemma3", "gemma4",
]  # fmt: skip
FAMILIES: tuple[str, ...] = get_args(Family)
# Family -> the module (in this package) whose build(spec) makes its config and processor.
BUILDERS = {"qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "qwen3_vl": "qwen", "qwen3_vl_moe": "qwen", "llava": "llava"}
BUILDERS |= {"qwen3_5": "qwen35", "qwen3_5_moe": "qwen35"}
BUILDERS |= {"llava_next": "llava_next", "llava_onevision": "llava_next"}
BUILDERS |= {"smolvlm": "smolvlm"}
BUILDERS |= {"internvl": "internvl", "glm4v": "glm4v"}
BUILDERS |= {"gemma3": "gemma", "gemma4": "gemma"}

# Part of the cache key: bumped when the saved folder changes, so folders cached by older code are rebuilt
# (2: the processor config holds the video processor that stock AutoProcessor needs).
FOLDER_VERSION = 2


@dataclass
class TinyVLM:
    """A toy-sized member of a real VLM family, built offline.

    Args:
        family: Which Hugging Face model family to instantiate (``llava`` is a CLIP + Llama
            LLaVA-style model, ``internvl`` InternVL3-style, ``glm4v`` GLM-4.1V).
        hidden_size: Width of the language model.
        num_layers: Decoder layers of the language model.
        num_heads: Attention heads of the language model (2 key/value heads).
        vision_depth: Blocks of the vision tower.
        vision_hidden_size: Width of the vision tower.
        vocab_size: Target size of the in-process BPE vocabulary.
        num_experts: Experts per MoE layer (MoE families only).
        min_pixels: Smallest image area the image processor resizes to.
        max_pixels: Largest image area the image processor resizes to (InternVL: tiles of 56x56 px
            covering at most this area, plus a thumbnail tile).
        seed: Seed of the random initialisation.
        tie_word_embeddings: Share the LM head's weight with the input embeddings (as Qwen2-VL-2B
            does); every family but ``llava``.
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


def save_tiny_vlm(spec: TinyVLM, out_dir: str | Path) -> Path:
    """Build the tiny model described by ``spec`` and save it (weights, tokenizer, processor) to ``out_dir``."""
    from transformers import AutoModelForImageTextToText

    from lightning_vlm.model.processing import save_processor

    if spec.family not in BUILDERS:
        raise ValueError(f"TinyVLM family {spec.family!r} is not one of {', '.join(FAMILIES)}")
    out_dir = Path(out_dir)
    builder = importlib.import_module(f"{__name__}.{BUILDERS[spec.family]}")
    config, processor = builder.build(spec)
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = AutoModelForImageTextToText.from_config(config)
        if hasattr(builder, "init"):  # weights the stock initialisation leaves at a value that hides the images
            builder.init(model)
    text_config = config.get_text_config()
    model.generation_config.eos_token_id = text_config.eos_token_id
    model.generation_config.pad_token_id = text_config.pad_token_id
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
