"""ExportHF: the trained model as a plain Hugging Face folder (LoRA merged, or adapters only) that
reloads as the trained model."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lightning_vlm import BackboneConfig, LoraSettings, TinyVLM, VLMBackbone
from lightning_vlm.data import SFTDataModule
from lightning_vlm.export import ExportHF
from lightning_vlm.objectives import SFT


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4)], ids=["full", "lora-merged"])
def test_export_hf_folder_reloads_as_the_trained_model(lora, synthetic_dir, tmp_path):
    torch.manual_seed(0)
    module = SFT(BackboneConfig(tiny=TinyVLM(), lora=lora), lr=1e-2)
    dm = SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), batch_size=8)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[ExportHF(str(tmp_path / "export"))])  # fmt: skip
    trainer.fit(module, dm)
    folder = tmp_path / "export"
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    assert not (folder / "adapter_config.json").exists()
    reloaded = VLMBackbone(BackboneConfig(model_name_or_path=str(folder)))
    reloaded.load()
    batch = next(iter(dm.train_dataloader()))
    args = (batch["input_ids"], batch["attention_mask"], batch["vision"], batch["labels_mask"])
    module.eval()  # LoRA dropout off
    with torch.no_grad():
        trained, again = module.backbone.token_logps(*args), reloaded.token_logps(*args)
        initial = VLMBackbone(BackboneConfig(tiny=TinyVLM()))
        initial.load()
        untrained = initial.token_logps(*args)
    assert torch.allclose(trained, again, atol=1e-5)
    assert not torch.allclose(untrained, again, atol=1e-3)  # the export holds the trained weights


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
