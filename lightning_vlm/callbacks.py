"""Callbacks shared by every objective."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L

from lightning_vlm.processing import save_processor


class ExportHF(L.Callback):
    """Write the trained policy as a plain Hugging Face folder at the end of ``fit``.

    The folder holds weights, config, tokenizer and processor, so it loads with
    ``backbone.model_name_or_path``, with ``AutoModelForImageTextToText.from_pretrained`` and in
    inference servers. Written to a temporary sibling and renamed into place (atomic).

    Args:
        dirpath: Output folder (replaced if it exists).
        merge_lora: Fold LoRA adapters into the weights (a standalone model); when False, save the
            adapters alone (a small peft folder that needs the base model).
    """

    def __init__(self, dirpath: str, merge_lora: bool = True):
        self.dirpath = Path(dirpath)
        self.merge_lora = merge_lora

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or not trainer.is_global_zero:
            return
        backbone = pl_module.backbone
        model = backbone.model
        is_peft = hasattr(model, "merge_and_unload")
        tmp = self.dirpath.with_name(f".{self.dirpath.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        if is_peft and self.merge_lora:
            import copy

            copy.deepcopy(model).merge_and_unload().save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        save_processor(backbone.processor, tmp)
        if self.dirpath.exists():
            shutil.rmtree(self.dirpath)
        os.rename(tmp, self.dirpath)
        print(f"exported the trained model to {self.dirpath}")
