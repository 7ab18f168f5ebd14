"""The tiny-model cache: a folder that older code built (and cached) is not reused."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from lightning_vlm import TinyVLM
from lightning_vlm.model.tiny import ensure_tiny_vlm


def test_a_folder_cached_by_older_code_is_not_reused():
    spec = TinyVLM()
    # The cache key before folder versions: the spec's hash, without tie_word_embeddings when it is False.
    old = {k: v for k, v in asdict(spec).items() if k != "tie_word_embeddings"}
    digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    stale = Path(os.environ["LIGHTNING_VLM_CACHE"]) / "tiny" / f"{spec.family}-{digest}"
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "tiny_vlm.json").write_text(json.dumps(asdict(spec)))  # a complete folder, to the old code
    folder = ensure_tiny_vlm(spec)
    assert folder != stale
    assert "video_processor" in json.loads((folder / "processor_config.json").read_text())
