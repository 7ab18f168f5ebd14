"""Sequence log-probs of preference pairs for the policy and the reference, shared by DPO and MPO.

Composed into the objectives (not a base class). A batch from the preference datamodule holds B
chosen then B rejected sequences; with ``copies == 2`` the prompt images are held once and the
vision tower runs once per pair. When the tower is frozen the reference reuses the policy's image
features, so a step encodes each image exactly once. Reference log-probs can also be computed in
one pass before training and cached per row. With the shared prefix (default), each pair's prompt runs once
and the two responses run on its KV cache (``lightning_vlm.model.prefix``).
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device

from lightning_vlm.model.backbone import VLMBackbone
from lightning_vlm.model.prefix import common_prefix, fallback_reason, shared_prefix_logps
from lightning_vlm.model.vision import has_images

log = logging.getLogger(__name__)
Pair = tuple[torch.Tensor, torch.Tensor]


class PairLogps:
    """Policy and reference log-probs of (chosen, rejected), summed or averaged over completion tokens.

    Args:
        backbone: The objective's backbone (built with a reference).
        average: Token-mean instead of sum per sequence (IPO's length normalisation).
        shared_prefix: Run each pair's prompt once (where it applies; else per sequence, said once in the logs).
    """

    def __init__(self, backbone: VLMBackbone, average: bool = False, shared_prefix: bool = True):
        self.backbone = backbone
        self.average = average
        self.shared_prefix = shared_prefix
        self.warned: set[str] = set()  # fallback reasons said
        self.cache: dict[str, dict[int, tuple[float, float]]] = {}  # split -> row -> (chosen, rejected)
        self.sources: dict[str, str] = {}  # split -> "source (N rows)" the cache was computed on

    def _sequence(self, logps: torch.Tensor, mask: torch.Tensor) -> Pair:
        seq = logps.sum(-1)  # (2B,)
        if self.average:
            seq = seq / mask.sum(-1).clamp(min=1)
        return tuple(seq.chunk(2))  # chosen (B,), rejected (B,)

    def split(self, batch: dict) -> tuple[tuple, torch.Tensor] | None:
        """The shared prefix's inputs and scored tokens (:func:`common_prefix`, once per batch: the policy and the
        reference pass share it), or None where it does not apply: each reason is said once per process, except
        a batch where sharing would run more tokens (said at debug level)."""
        if not self.shared_prefix:
            return None
        if "shared_prefix" not in batch:
            why = fallback_reason(self.backbone) if batch["copies"] > 1 else "vision_once is off"
            inputs = (batch[k] for k in ("input_ids", "attention_mask", "labels_mask", "vision", "copies"))
            batch["shared_prefix"] = why or common_prefix(*inputs)
        split = batch["shared_prefix"]
        if not isinstance(split, str):
            return split
        kind = re.sub(r"\d+", "#", split)
        if kind.startswith("the shared prefix would run"):
            log.debug("split %s: pairs scored per sequence: %s", batch.get("split"), split)
        elif kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(f"model.shared_prefix is on but pairs are scored per sequence: {split}", stacklevel=2)
        return None

    def _token_logps(self, batch: dict, model: Any = None, features: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(token log-probs, the scored tokens): (2B, N) completion tokens with the shared prefix, else (2B, T)."""
        split = self.split(batch)
        if split is not None:
            inputs, targets = split
            logps = shared_prefix_logps(self.backbone, *inputs, model=model, features=features, targets=targets)
            return logps[0], targets
        logps = self.backbone.token_logps(
            batch["input_ids"],
            batch["attention_mask"],
            batch["vision"],
            batch["labels_mask"],
            model=model,
            copies=batch["copies"],
            features=features,
        )
        return logps, batch["labels_mask"]

    def _features(self, batch: dict) -> Any:
        """Encode the batch's images once, for both sequences of each pair (and the reference, when
        the tower is frozen). A per-sequence batch (``copies == 1``) takes the plain path."""
        shared = batch["copies"] > 1 and has_images(batch["vision"])
        return self.backbone.encode_images(batch["vision"]) if shared else None

    def policy(self, batch: dict) -> tuple[Pair, tuple[torch.Tensor, torch.Tensor], Any]:
        """((chosen, rejected), (token log-probs, scored tokens) of :meth:`_token_logps`, image features)."""
        features = self._features(batch)
        logps, mask = self._token_logps(batch, features=features)
        return self._sequence(logps, mask), (logps, mask), features

    @torch.no_grad()
    def reference(self, batch: dict, features: Any = None) -> Pair:
        """(chosen, rejected) of the reference: from the cache, or one no-grad forward."""
        rows = self.cache.get(batch["split"])
        if rows is not None and all(r in rows for r in batch["rows"]):
            values = torch.tensor([rows[r] for r in batch["rows"]], device=batch["input_ids"].device)
            return values[:, 0], values[:, 1]
        if self.backbone.config.lora is None and self.backbone._reference is None:
            missing = [r for r in batch["rows"] if r not in (rows or {})]
            raise RuntimeError(
                f"split {batch['split']!r}: rows {missing[:5]} have no precomputed reference log-probs and "
                "the reference copy was released after precomputing (train and val are cached; run "
                "test/predict in their own command, or set precompute_ref_logps: false)"
            )
        if not self.backbone.vision_is_frozen:
            features = None  # the reference's image side differs from the trained one
        with self.backbone.reference() as ref:
            return self._sequence(*self._token_logps(batch, ref, features))

    @torch.no_grad()
    def precompute(self, module, splits: tuple[str, ...] = ("train", "val")) -> None:
        """Cache the reference log-probs of every row of ``splits`` (each rank scores its share), then
        release the frozen reference copy: steps read the cache instead of running it."""
        dm = module.trainer.datamodule
        if not hasattr(dm, "scan_dataloader"):
            raise TypeError(
                "precompute_ref_logps needs a datamodule with scan_dataloader (PreferenceDataModule)"
            )
        for split in splits:
            if split not in dm.datasets:
                continue
            source = f"{dm.sources[split]} ({len(dm.datasets[split])} rows)"
            if split in self.cache and self.sources.get(split) == source:
                continue
            if split in self.cache:
                log.warning(
                    "%s: reference log-probs were cached for %s; recomputing", source, self.sources.get(split)
                )
            rows, values = [], []
            for batch in dm.scan_dataloader(split):
                batch = move_data_to_device(batch, module.device)
                with module.trainer.precision_plugin.forward_context():
                    c, r = self.reference(batch, self._features(batch))
                rows.append(torch.tensor(batch["rows"], device=module.device))
                values.append(torch.stack([c, r], -1).float())
            rows_t = module.all_gather(torch.cat(rows)).reshape(-1)  # (world * n,)
            values_t = module.all_gather(torch.cat(values)).reshape(-1, 2)
            self.cache[split] = {
                int(i): (float(c), float(r))
                for i, (c, r) in zip(rows_t.tolist(), values_t.tolist(), strict=True)
            }
            self.sources[split] = source
        self.backbone.release_reference()

    def state_dict(self) -> dict[str, Any]:
        rows = {split: {str(k): v for k, v in cached.items()} for split, cached in self.cache.items()}
        return {"rows": rows, "sources": dict(self.sources)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rows = state.get("rows", {})
        self.cache = {s: {int(k): tuple(v) for k, v in cached.items()} for s, cached in rows.items()}
        self.sources = dict(state.get("sources", {}))
