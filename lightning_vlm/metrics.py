"""Answer normalisation and exact match, shared by evaluation and (later) accuracy rewards."""

from __future__ import annotations

import re
import string

_PUNCT = string.punctuation + " \t\n"


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace and strip surrounding punctuation: ``" Red."`` -> ``"red"``."""
    return re.sub(r"\s+", " ", text).strip(_PUNCT).lower()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)
