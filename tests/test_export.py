"""ExportHF: the trained model as a plain Hugging Face folder (LoRA merged, or adapters only) that
reloads as the trained model, and loads in stock transformers with and without torchvision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers
from PIL import Image

from lightning_vlm import BackboneConfig, LoraSettings, TinyVLM, VLMBackbone
from lightning_vlm.data import SFTDataModule
from lightning_vlm.export import ExportHF
from lightning_vlm.model.tiny import ensure_tiny_vlm
from lightning_vlm.objectives import SFT
from tests.helpers import stock_load

# Per family: the stock processor and video processor a torchvision user's AutoProcessor must build.
STOCK = {
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "qwen3_vl_moe": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "llava": ("LlavaProcessor", None),
    "gemma3": ("Gemma3Processor", None),
    "gemma4": ("Gemma4Processor", "Gemma4VideoProcessor"),
}
# The torchvision test venv (made by .ci/tv-venv; CI always has it).
TV_PYTHON = Path(
    os.environ.get("LIGHTNING_VLM_TV_PYTHON", Path(__file__).parents[1] / ".venv-tv" / "bin" / "python")
)


@pytest.fixture(scope="module")
def exports(synthetic_dir, tmp_path_factory):
    """Two-step SFT runs and their exports: full fine-tuning, and LoRA (merged on export)."""
    runs = {}
    for name, lora in (("full", None), ("lora-merged", LoraSettings(r=4))):
        torch.manual_seed(0)
        module = SFT(BackboneConfig(tiny=TinyVLM(), lora=lora), lr=1e-2)
        dm = SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), batch_size=8)
        folder = tmp_path_factory.mktemp(name) / "export"
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, callbacks=[ExportHF(str(folder))])  # fmt: skip
        trainer.fit(module, dm)
        runs[name] = module.eval(), folder, dm  # eval: LoRA dropout off
    return runs


@pytest.mark.parametrize("name", ["full", "lora-merged"])
def test_export_hf_folder_reloads_as_the_trained_model(name, exports):
    module, folder, dm = exports[name]
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    assert not (folder / "adapter_config.json").exists()
    reloaded = VLMBackbone(BackboneConfig(model_name_or_path=str(folder)))
    reloaded.load()
    batch = next(iter(dm.train_dataloader()))
    args = (batch["input_ids"], batch["attention_mask"], batch["vision"], batch["labels_mask"])
    with torch.no_grad():
        trained, again = module.backbone.token_logps(*args), reloaded.token_logps(*args)
        initial = VLMBackbone(BackboneConfig(tiny=TinyVLM()))
        initial.load()
        untrained = initial.token_logps(*args)
    assert torch.allclose(trained, again, atol=1e-5)
    assert not torch.allclose(untrained, again, atol=1e-3)  # the export holds the trained weights


def _picture(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 3 % 256, y * 5 % 256, x * y % 256) for y in range(height) for x in range(width)])
    return image


@pytest.fixture(scope="module")
def stock_request(exports, tmp_path_factory):
    """Every kind of folder we write (a tiny model of each family, both exports) as a request for
    tests/helpers/stock_load.py, with what our own processor makes of the same images: one the image
    processor keeps at its size, one it resizes; the exports' inputs for the trained model too."""
    root = tmp_path_factory.mktemp("stock")
    folders = {f: ensure_tiny_vlm(TinyVLM(family=f)) for f in STOCK} | {
        n: run[1] for n, run in exports.items()
    }
    request, ours = {}, {}
    for name, folder in folders.items():
        processor = VLMBackbone(BackboneConfig(model_name_or_path=str(folder))).processor
        ip = processor.image_processor
        if hasattr(ip, "merge_size"):  # Qwen: whole merged patches
            kept = (4 * ip.patch_size * ip.merge_size, 3 * ip.patch_size * ip.merge_size)
        elif hasattr(ip, "pooling_kernel_size"):  # Gemma 4: 8 x 8 pooled patches, 64 of its 70 tokens
            kept = (8 * ip.patch_size * ip.pooling_kernel_size,) * 2
        else:  # LLaVA, Gemma 3: the square the image is resized to
            kept = ((ip.crop_size or ip.size)["height"],) * 2
        images = [str(root / f"{name}-{i}.png") for i in range(2)]
        for path, size in zip(images, (kept, (90, 70)), strict=True):
            _picture(*size).save(path)
        text = processor.apply_chat_template(stock_load.MESSAGES, add_generation_prompt=True, tokenize=False)
        ours[name] = {
            "outputs": [
                dict(processor(text=[text], images=[Image.open(p)], return_tensors="pt")) for p in images
            ],
            "image_outputs": [dict(ip(images=[Image.open(p)], return_tensors="pt")) for p in images],
            "token_ids": processor.tokenizer(stock_load.TEXT)["input_ids"],
        }
        request[name] = {"folder": str(folder), "images": images, "inputs": None}
        if name in exports:
            request[name]["inputs"] = str(root / f"{name}-inputs.pt")
            torch.save(ours[name]["outputs"][0], request[name]["inputs"])
            with torch.no_grad():
                ours[name]["logits"] = exports[name][0].backbone.model(**ours[name]["outputs"][0]).logits
    (root / "request.json").write_text(json.dumps(request))
    return root, ours


def _stock_load(python: Path | str, root: Path, label: str) -> dict:
    """Run tests/helpers/stock_load.py in a fresh, isolated interpreter (-I: no PYTHONPATH, so no checkout)."""
    cmd = [str(python), "-I", stock_load.__file__, str(root / "request.json"), str(root / f"{label}.pt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(root / f"{label}.pt")


def _assert_same(got: dict, ours: dict, pixel_atol: float | None = 0.0) -> None:
    """The same processor outputs: every tensor exactly, but pixel_values within pixel_atol (None: the
    same shape only)."""
    assert got.keys() == ours.keys()
    for key in got:
        if key != "pixel_values":
            assert torch.equal(got[key], ours[key]), key
        elif pixel_atol is None:
            assert got[key].shape == ours[key].shape
        else:
            assert torch.allclose(got[key], ours[key], atol=pixel_atol, rtol=0.0)


def test_folders_load_in_stock_transformers_without_torchvision(stock_request, exports):
    """Stock transformers without torchvision cannot build a Qwen-VL processor for any folder (its video
    processor class needs torchvision, also for the hub's own folders): there the folder's tokenizer and
    image processor load and match ours, and AutoProcessor fails only on that import."""
    root, ours = stock_request
    result = _stock_load(sys.executable, root, "main")
    env = result.pop("_env")
    assert not env["imported_lightning_vlm"]
    if env["torchvision"]:
        pytest.skip(
            "torchvision is installed here: test_folders_load_in_stock_transformers_with_torchvision covers it"
        )
    for name, got in result.items():
        stock, video = STOCK.get(name, STOCK["qwen2_vl"])
        assert got["token_ids"] == ours[name]["token_ids"]
        for image_outputs, our_image_outputs in zip(
            got["image_outputs"], ours[name]["image_outputs"], strict=True
        ):
            _assert_same(image_outputs, our_image_outputs)
        if video is None:  # a processor without a video half: the stock class, and our outputs exactly
            assert got["processor"] == stock
            for outputs, our_outputs in zip(got["outputs"], ours[name]["outputs"], strict=True):
                _assert_same(outputs, our_outputs)
        else:  # the video processor named in our folder, failing only on its torchvision import
            assert got["processor_error"].startswith(f"ImportError: {video} requires the Torchvision library")
        if name in exports:  # merged into plain weights, which stock AutoModelForImageTextToText loads
            assert not (Path(exports[name][1]) / "adapter_config.json").exists()
            assert torch.allclose(got["logits"], ours[name]["logits"], atol=1e-5)


def test_folders_load_in_stock_transformers_with_torchvision(stock_request):
    """With torchvision, AutoProcessor builds the family's stock processor (video half included) and
    processes text and images as ours: ids and grids exactly, pixels to float rounding (torchvision's
    arithmetic against PIL's) where no resize happens; resampling itself differs between the two backends."""
    if not TV_PYTHON.exists():
        why = f"no torchvision test venv at {TV_PYTHON}: make it with `bash .ci/tv-venv` or set LIGHTNING_VLM_TV_PYTHON"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    root, ours = stock_request
    result = _stock_load(TV_PYTHON, root, "torchvision")
    assert result.pop("_env") == {
        "torchvision": True, "transformers": transformers.__version__, "imported_lightning_vlm": False
    }  # fmt: skip
    for name, got in result.items():
        stock, video = STOCK.get(name, STOCK["qwen2_vl"])
        assert "processor_error" not in got, got.get("processor_error")
        assert (got["processor"], got.get("video_processor")) == (stock, video), name
        (kept, resized), (our_kept, our_resized) = got["outputs"], ours[name]["outputs"]
        _assert_same(kept, our_kept, pixel_atol=1e-6)
        _assert_same(resized, our_resized, pixel_atol=None)
        if video is not None:  # frames are cut like images, and a 2-frame clip is one temporal patch
            assert got["video_settings"] == got["image_settings"]
            assert "video_grid_thw" not in got or got["video_grid_thw"][0, 0] == 1
            assert "pixel_values_videos" in got["video_keys"]


def test_export_adapters_only(synthetic_dir, tmp_path):
    module = SFT(BackboneConfig(tiny=TinyVLM(), lora=LoraSettings(r=4), vision="train"))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[ExportHF(str(tmp_path / "a"), merge_lora=False)])  # fmt: skip
    trainer.fit(module, SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), batch_size=8))
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    assert not (tmp_path / "a" / "model.safetensors").exists()
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert any("visual" in k and "lora_" not in k for k in keys)  # the trained vision tower travels too
    # The adapter folder loads as base + merged adapters (e.g. to start the next stage from it).
    reloaded = VLMBackbone(BackboneConfig(model_name_or_path=str(tmp_path / "a")))
    reloaded.load()
    batch = next(iter(trainer.datamodule.train_dataloader()))
    args = (batch["input_ids"], batch["attention_mask"], batch["vision"], batch["labels_mask"])
    module.eval()
    with torch.no_grad():
        assert torch.allclose(module.backbone.token_logps(*args), reloaded.token_logps(*args), atol=1e-5)
