"""Load our saved folders with stock transformers only, as a user's plain script would.

Run as a file in a fresh interpreter (``python -I stock_load.py request.json out.pt``): it imports
transformers, torch and PIL, never lightning_vlm, and says so in its output. The request names each folder
with the images to process, and for exports the model inputs to run; the output holds, per folder, the
class each Auto class loaded (or the error it raised) and the tensors it produced.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.utils import is_torchvision_available

TEXT = "What colour is it?"
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXT}]}]
# A 2-frame clip's prompt, by video token, for the families whose video grid the test checks (Qwen-VL, GLM-4.1V).
VIDEO = {"<|video_pad|>": "<|vision_start|><|video_pad|><|vision_end|>What happens?",
         "<|video|>": "<|video|>What happens?"}  # fmt: skip
SETTINGS = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "size")


def load(folder: str, images: list[str], inputs: str | None) -> dict:
    pictures = [Image.open(p).convert("RGB") for p in images]
    out: dict = {}
    image_processor = AutoImageProcessor.from_pretrained(folder)
    out["image_processor"] = type(image_processor).__name__
    out["image_outputs"] = [dict(image_processor(images=[p], return_tensors="pt")) for p in pictures]
    out["token_ids"] = AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"]
    if inputs is not None:
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        with torch.no_grad():
            out["logits"] = model(**torch.load(inputs)).logits
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except Exception as e:  # reported, and judged by the test
        out["processor_error"] = f"{type(e).__name__}: {str(e).strip()}"
        return out
    out["processor"] = type(processor).__name__
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    out["outputs"] = [dict(processor(text=[text], images=[p], return_tensors="pt")) for p in pictures]
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is not None:
        out["video_processor"] = type(video_processor).__name__
        saved = video_processor.to_dict(), processor.image_processor.to_dict()
        out["video_settings"], out["image_settings"] = ({k: d.get(k) for k in SETTINGS} for d in saved)
        text = VIDEO.get(getattr(processor, "video_token", None))  # a clip where we know how to write one
        if text is not None:
            frames = torch.stack([torch.from_numpy(np.asarray(pictures[0])).permute(2, 0, 1)] * 2)  # 2 frames
            video = processor(text=[text], videos=[frames], do_sample_frames=False, return_tensors="pt")
            out["video_grid_thw"] = video.get("video_grid_thw")
    return out


def main(request_path: str, out_path: str) -> None:
    request = json.loads(open(request_path).read())
    result = {name: load(**spec) for name, spec in request.items()}
    result["_env"] = {
        "torchvision": is_torchvision_available(),
        "transformers": transformers.__version__,
        "imported_lightning_vlm": any(m.split(".")[0] == "lightning_vlm" for m in sys.modules),
    }
    torch.save(result, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
