"""Processor loading and saving that work with and without torchvision.

In transformers 5.x several stock processors (Qwen-VL, LLaVA-OneVision, SmolVLM, InternVL, GLM-4.1V, Gemma 4)
hold a video processor that needs torchvision. Where
torchvision is missing we build the same processor class without its video half (images and text behave
exactly as in the stock class) and save it as the complete stock processor; where torchvision is present
users get the stock processor untouched.
"""

from __future__ import annotations

import functools
import inspect
import json
import warnings
from pathlib import Path

import transformers
from transformers.utils import is_torchvision_available

_PREFIX = "ImageOnly"


class _VideoStandIn:
    """The missing video processor: stock code that reads its settings unconditionally (SmolVLM's
    ``apply_chat_template`` reads ``num_frames`` and ``fps``) reads None; processing a video is refused."""

    def __getattr__(self, name: str):
        return None

    def __call__(self, *args, **kwargs):
        raise ValueError("videos need the stock processor's video processor, which needs torchvision")


@functools.cache
def _no_video() -> type:
    """A class to sit between a stock processor and ``ProcessorMixin``: it drops the ``video_processor=None``
    that a stock ``__init__`` forwards by keyword (Gemma 4's; Qwen's forward it positionally, where it is
    dropped anyway). Made on first use: ``ProcessorMixin`` imports the model code, which ``--help`` avoids."""

    class _NoVideo(transformers.ProcessorMixin):
        def __init__(self, *args, video_processor=None, **kwargs):
            super().__init__(*args, **kwargs)

    return _NoVideo


@functools.cache
def image_only_processor(stock_name: str) -> type:
    """The stock processor class ``stock_name`` minus its video processor."""
    stock = getattr(transformers, stock_name)

    def __init__(self, *args, **kwargs):
        stock.__init__(self, *args, video_processor=None, **kwargs)

    # ProcessorMixin takes its sub-processors from this signature: the stock one, minus the video processor.
    signature = inspect.signature(stock.__init__)
    params = [p for name, p in signature.parameters.items() if name != "video_processor"]
    __init__.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    name = f"{_PREFIX}{stock_name}"
    body = {"__init__": __init__, "__module__": __name__, "__qualname__": name}
    body["video_processor"] = _VideoStandIn()  # a class attribute: never saved with the processor's settings
    cls = type(name, (stock, _no_video()), body)
    globals()[name] = cls  # findable by name, so processors pickle into spawned DataLoader workers
    return cls


def __getattr__(name: str):
    # Unpickling in a fresh process looks the class up here before anything has built it.
    if name.startswith(_PREFIX) and hasattr(transformers, name[len(_PREFIX) :]):
        return image_only_processor(name[len(_PREFIX) :])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Each stock processor's video processor. Its class needs torchvision, so without it we write its name and the
# settings it shares with the image processor (frames are cut like images), for stock transformers to build.
_VIDEO_PROCESSOR = {"Qwen2VLProcessor": "Qwen2VLVideoProcessor", "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
                    "Qwen3VLProcessor": "Qwen3VLVideoProcessor", "SmolVLMProcessor": "SmolVLMVideoProcessor"}  # fmt: skip
_VIDEO_PROCESSOR["LlavaOnevisionProcessor"] = "LlavaOnevisionVideoProcessor"
_VIDEO_PROCESSOR |= {"InternVLProcessor": "InternVLVideoProcessor", "Glm4vProcessor": "Glm4vVideoProcessor"}
_VIDEO_PROCESSOR["Gemma4Processor"] = "Gemma4VideoProcessor"
_SHARED = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "size", "resample",
           "do_resize", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb")  # fmt: skip


def save_processor(processor, folder: str | Path) -> None:
    """``save_pretrained``, but an image-only processor is saved as the complete stock processor: its stock
    class name and the family's video processor (settings taken from the image processor), so that the
    folder loads with ``AutoProcessor`` wherever torchvision is installed.
    """
    processor.save_pretrained(folder)
    stock = type(processor).__name__.removeprefix(_PREFIX)
    if stock == type(processor).__name__:
        return
    cfg_path = Path(folder) / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["processor_class"] = stock
    if stock in _VIDEO_PROCESSOR:
        video = {k: v for k, v in cfg["image_processor"].items() if k in _SHARED}
        cfg["video_processor"] = {**video, "video_processor_type": _VIDEO_PROCESSOR[stock]}
    else:  # the folder still loads with us; failing here would lose the run at its end
        warnings.warn(f"{cfg_path}: no video processor known for {stock} (AutoProcessor's)", stacklevel=2)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _processor_class_name(path: str, config) -> str:
    local = Path(path) / "processor_config.json"
    if local.is_file():
        name = json.loads(local.read_text()).get("processor_class")
        if name:
            return name
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise ValueError(f"{path}: no processor class is known for model_type {config.model_type!r}")
    return name


def load_processor(path: str, config, trust_remote_code: bool = False, **kwargs):
    """Load the processor saved with a model (hub id or local folder).

    Args:
        path: Hub id or local folder.
        config: The model's loaded config (used to find the processor class).
        trust_remote_code: Allow custom code from the folder.
        **kwargs: Image-processor settings such as ``min_pixels`` / ``max_pixels``.
    """
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoProcessor, AutoTokenizer

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    name = _processor_class_name(path, config)
    stock = getattr(transformers, name, None)
    if stock is None or "video_processor" not in inspect.signature(stock.__init__).parameters:
        # Image-only processors (LLaVA, ...) construct fine without torchvision.
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    file = Path(path) / "chat_template.jinja"
    template = tokenizer.chat_template or (file.read_text() if file.is_file() else None)
    parts = {"image_processor": image_processor, "tokenizer": tokenizer, "chat_template": template}
    if "feature_extractor" in inspect.signature(stock.__init__).parameters:  # the audio side (Gemma 4)
        parts["feature_extractor"] = AutoFeatureExtractor.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = image_only_processor(name)
    saved = stock.get_processor_dict(path)[0]  # the processor's own settings too (num_image_tokens, ...)
    own = set(inspect.signature(cls).parameters) - set(parts)
    return cls(**parts, **{k: v for k, v in saved.items() if k in own})
