"""Callbacks shared by every objective."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import lightning as L
import torch

from lightning_vlm.checkpoints import clean_leftovers, partial_path, replace
from lightning_vlm.model.processing import save_processor


class ExportHF(L.Callback):
    """Write the trained policy as a plain Hugging Face folder at the end of ``fit``.

    The folder holds weights, config, tokenizer and processor, so it loads with
    ``backbone.model_name_or_path``, with ``AutoModelForImageTextToText.from_pretrained`` and in
    inference servers. Written to a temporary sibling and renamed into place: a crash leaves the previous
    export whole (put back at its name, if it was moved aside, when the next run starts).
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True, dtype: str | None = None):
        """
        Args:
            dirpath: Output folder (replaced if it exists); default ``hf`` in the run folder
                (``trainer.default_root_dir``).
            merge_lora: Fold LoRA adapters into the weights (a standalone model); when False, save the
                adapters alone (a small peft folder that needs the base model; a vision tower trained
                under LoRA is saved with them).
            dtype: Cast the exported weights, e.g. ``bfloat16`` (default: as trained).
        """
        self.dirpath = Path(dirpath) if dirpath else None
        self.merge_lora = merge_lora
        self.dtype = dtype

    def folder(self, trainer: L.Trainer) -> Path:
        """Where the export goes: ``dirpath``, else ``hf`` in the run folder."""
        return self.dirpath or Path(trainer.default_root_dir, "hf")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:  # what a killed export left: its partial copy, the previous export aside
            clean_leftovers(self.folder(trainer).parent, self.folder(trainer).name)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        state = _gather_if_sharded(pl_module)  # FSDP2: a collective, so every rank takes part
        if not trainer.is_global_zero:
            return
        folder = self.folder(trainer)
        tmp = partial_path(folder)
        try:
            self._write(tmp, pl_module, state)
            replace(tmp, folder)  # the previous export stays whole until the new one is in place
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"exported the trained model to {folder}")

    def _write(self, tmp: Path, pl_module: L.LightningModule, state: dict[str, torch.Tensor] | None) -> None:
        backbone = pl_module.backbone
        model = backbone.model
        if state is not None:  # an unsharded copy, loaded as the backbone loads, with the trained weights
            from lightning_vlm.model.backbone import VLMBackbone

            fresh = VLMBackbone(backbone.config)
            fresh.load()
            prefix = "backbone.model."
            result = fresh.model.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=False
            )
            # Under FSDP2 a tied LM head has no weight of its own: it is the input embeddings'.
            embeddings = fresh.model.get_input_embeddings().weight
            tied = {n for n, p in fresh.model.named_parameters(remove_duplicate=False) if p is embeddings}
            if result.unexpected_keys or set(result.missing_keys) - tied:
                raise RuntimeError(
                    "ExportHF: the gathered weights do not match the model: missing "
                    f"{sorted(set(result.missing_keys) - tied)[:3]}, unexpected {result.unexpected_keys[:3]}"
                )
            export = fresh.model
        else:
            device = next(model.parameters()).device
            model.to("cpu")  # copy on the host, not on a full accelerator
            try:
                export = copy.deepcopy(model)
            finally:
                model.to(device)
        if hasattr(export, "merge_and_unload") and self.merge_lora:
            export = export.merge_and_unload()
        if self.dtype:
            export.to(getattr(torch, self.dtype))
        export.save_pretrained(tmp)
        save_processor(backbone.processor, tmp)
        if hasattr(pl_module, "save_extra"):  # e.g. the reward model's head
            pl_module.save_extra(tmp, state)


def _gather_if_sharded(module: L.LightningModule) -> dict[str, torch.Tensor] | None:
    """The module's full state dict on the CPU when FSDP2 shards it (every rank must call this), else None."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in module.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
