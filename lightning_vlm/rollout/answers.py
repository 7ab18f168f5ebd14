"""Does a completion's final answer equal the reference answer? Extraction, exact and choice matching,
and math-verify (https://github.com/huggingface/Math-Verify, the verifier of TRL, verl, ms-swift and
NeMo-RL) for mathematical answers."""

from __future__ import annotations

import functools
import re
import threading

from lightning_vlm.metrics import normalize_answer

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_CHOICE = re.compile(r"^(?:the\s+)?(?:answer|option|choice)?\s*(?:is)?\s*:?\s*\(?([a-z])\)?[.):]?$")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?$")
_FRAC = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_DIGITS = re.compile(r"[-+\d.,\s]+")
_MATHS = re.compile(r"[\d\\+\-*/^=<>()\[\]{}]")  # a digit, a LaTeX command or an operator: maths
# A unit of measurement after a number, dropped before maths (a one-letter unit after a space: "2m" may
# be 2*m). Not math-verify's own list: it holds words such as "square", "are", "less" ("3 less" = 3).
_UNIT = re.compile(
    r"(?<=[\d}])(?:\s*(?:[mck]m|inch(?:es)?|ft|foot|feet|yd|yards?|miles?|(?:centi|milli|kilo)?met(?:er|re)s?"
    r"|[mk]g|(?:kilo)?grams?|lbs?|pounds?|oz|ounces?|tons?|ml|lit(?:er|re)s?|ms|secs?|seconds|mins?|minutes?"
    r"|hrs?|hours?|days?|weeks?|months?|years?|degrees?|deg|mph|km/h|m/s|dollars?|cents?|units?|°)"
    r"|\s+[mgslh])(?:\^\{?[23]\}?)?\s*$"
)
# Seconds math-verify may spend parsing one answer or comparing two (a whole number: signal.alarm).
# Ordinary answers take milliseconds; this only stops pathological ones such as 9^{9^{9^{9}}}.
MATH_TIMEOUT_S = 1


def extract_answer(text: str) -> str:
    """The final answer in a completion: the last ``<answer>...</answer>`` (else the whole text), and in
    it the last ``\\boxed{...}`` (nested braces allowed) if there is one."""
    tags = _ANSWER_TAG.findall(text)
    text = tags[-1] if tags else text
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j]
    return text


def canonical(text: str) -> str:
    """Normalise an answer for comparison: case, spaces and outer punctuation; numbers to one form
    (``"1,000"``, ``"1000.0"`` -> ``"1000"``; ``"1/2"`` and ``"\\frac{1}{2}"`` -> ``"0.5"``; a trailing
    ``%`` is dropped); choice letters to the letter (``"(B)"``, ``"\\text{(B)}"``, ``"B."``, ``"Answer: b"``
    -> ``"b"``)."""
    norm = normalize_answer(_TEXT.sub(r"\1", _FRAC.sub(r"\1/\2", text)).replace("\\!", ""))
    compact = norm.replace(",", "").replace(" ", "").rstrip("%")
    if "/" in compact and compact.count("/") == 1:
        num, den = compact.split("/")
        if _NUMBER.match(num) and _NUMBER.match(den) and float(den) != 0:
            return f"{float(num) / float(den):.10g}"
    if _NUMBER.match(compact):
        return f"{float(compact):.10g}"
    choice = _CHOICE.match(norm)
    if choice:
        return choice.group(1)
    return norm


def same_answer(completion: str, reference: str) -> bool:
    """The final answers of ``completion`` and ``reference`` (:func:`extract_answer`) match: their
    :func:`canonical` forms are equal, or both look mathematical (a digit, a LaTeX command or an operator),
    are not both plain numbers, and math-verify finds them equal after a unit of measurement is dropped
    (``x = 5`` = ``5``, ``30^\\circ`` = ``30``, ``2\\pi`` = ``2 \\pi``, ``\\sqrt 2`` = ``\\sqrt{2}``,
    ``12 cm`` = ``12``, ``50%`` = ``0.5``)."""
    answer, ref = extract_answer(completion), extract_answer(reference)
    if canonical(answer) == canonical(ref):
        return True
    if _DIGITS.fullmatch(answer) and _DIGITS.fullmatch(ref):
        return False  # two plain numbers: decided (math-verify reads "1 1" as 1 + 1)
    if not (_MATHS.search(answer) and _MATHS.search(ref)):
        return False  # words are not maths: "red" would be the product r*e*d, equal to "der"
    return _math_equal(_UNIT.sub("", _TEXT.sub(r"\1", answer)), _UNIT.sub("", _TEXT.sub(r"\1", ref)))


def _math_equal(answer: str, reference: str) -> bool:
    from math_verify import verify

    # math-verify times out with signal.alarm, which only the main thread may set: elsewhere it runs
    # without a timeout rather than raise.
    timeout = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold = _read(reference, timeout)
    return bool(gold) and verify(list(gold), list(_read(answer, timeout)), timeout_seconds=timeout)


@functools.lru_cache(maxsize=4096)  # a group's completions share their reference, and often their answer
def _read(text: str, timeout: int | None) -> tuple:
    """``text`` read by math-verify as one LaTeX expression (empty when it cannot)."""
    from math_verify import LatexExtractionConfig, parse
    from math_verify.parser import NormalizationConfig

    norm = NormalizationConfig(basic_latex=True, units=False, malformed_operators=True, boxed="all")
    config = [LatexExtractionConfig(boxed_match_priority=0, normalization_config=norm)]
    return tuple(parse(f"\\boxed{{{text}}}", config, fallback_mode="no_fallback", parsing_timeout=timeout))
