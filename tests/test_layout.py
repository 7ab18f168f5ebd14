"""The package's shape (docs/architecture.md): imports only go down the layers, no import cycles, no
module over 300 lines, and the package no larger than its budget."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_vlm"
# Layer of each top-level part; an import may only go to the same layer or below.
LAYERS = {
    "losses": 0,
    "data": 0,
    "metrics": 0,
    "model": 1,
    "rollout": 2,
    "objectives": 3,
    "export": 4,
    "checkpoints": 4,
    "progress": 4,
    "cli": 4,
}
# The issue asks for 5,600 (the size before RLOO and the engines); this is a ratchet until then.
# The hardening issue added ~600 lines (row and file checks, atomic checkpoints, settings and checkpoint
# checks, encode-once paths, worker timeouts); the 5,600 target is not met, see the issue notes.
# The start-up issue added 22, the progress lines and bar totals 152 (progress.py); rewards that don't lie
# 89 (math-verify with its guards, TRL-form reward calls); +254 for data sources as datasets names them, streaming, and cached row checks (data/sources.py,
# data/loaders.py; the JSON reading and the loaders moved there from rows.py and base.py).
# Truncated importance sampling for a sampler that is not the trainer (issue 13): +61 in losses/, +26 in the
# loop, its settings and the four objectives.
# The vLLM rollout engine (issue 13): +367 (rollout/vllm_engine.py 285, rollout/weight_sync.py 76, the request's
# raw images and rows, the sync's timing).
# SFT prompt-completion rows, extra columns in batches, grad norm, the SFT samples table (issue 14, items 7 and 9): +110.
# One run folder (issue 14): +39 (unset logger/checkpoint/export folders follow trainer.default_root_dir, the
# refusal of a second fit into it, --overwrite).
# The preference samples table (issue 14, item 7): +65 (objectives/preference/base.py, the shared base of DPO,
# MPO and the reward model, less their predict_step; the validation table writer shared with SFT).
# Model families (issue 16): tiny.py became the tiny/ package, a builder module per family group: +27 for the
# split (module docstrings and imports). Qwen3.5 and Qwen3.5-MoE: +62 (tiny/qwen35.py 59, the family table 1,
# the cache repeat of prompt-once generation for linear-attention layers 2).
# LLaVA-NeXT and LLaVA-OneVision (issue 16): +83 (tiny/llava_next.py 71; image-only processors keep the stock
# processor's own settings, and OneVision's video processor, 9; the families' names 3).
# SmolVLM: +92 (tiny/smolvlm.py 64;
# image-only processors keep the stock settings and read a stub video processor 23; collation 8, row checks -3).
# InternVL and GLM-4.1V: +109 for their builders (tiny/internvl.py,
# tiny/glm4v.py), +15 in the library (image-only processors keep the stock processor's own settings and save
# InternVL's and GLM-4.1V's video processors; label masks take the processor's image delimiters), +5 so that
# generation never emits GLM's image/video delimiters (config) nor InternVL's <img>, </img> (tokenizer).
# Gemma 3 and Gemma 4: +153 (tiny/gemma.py 106; label masks from the processor's own replacement offsets,
# images per text, the feature extractor of Gemma 4's processor, a builder's init hook).
# The review of the family merge: +8 (the two-image probe, Gemma 4's audio tokens never generated).
# The final review: -5 (one ViT tower size helper for five builders; Qwen3.5 reuses the Qwen builder).
# Padding-free packed SFT (issue 15): +205 (model/packing.py 101, data/packing.py 51, the SFT datamodule's
# packing and max_tokens with the token-budget sampler, the backbone's packed branch, row lengths kept).
# Resuming packed SFT with another data.packing or data.max_tokens is refused: +23 (data/sft.py).
# Shared prefix under activation checkpointing: +33 (its own cache, kept by the checkpointed layers, read-only
# for the completions, emptied for the prompt layers' replays).
# The shared prefix imports transformers inside its functions (--help stays light): +5.
# The base datamodule no longer reads SFT's packing knob (a _rows_per_batch hook SFT overrides): +6.
# Shared prefix for preference pairs (DPO, IPO, hinge, MPO, the reward model): +78 (common_prefix cuts each
# pair's prompt from its left-padded sequences; PairLogps and the reward model choose the path and say why not).
# Its review: +13 (the split vectorised and run once per batch, each fallback reason said once per process,
# batches where padding would cost more than sharing saves scored per sequence).
# The last look: +6 (the reward model reads its last token in one place for both paths; read_head replaces four
# copies of the head call).
MAX_LINES, MAX_TOTAL = 300, 8612


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["lightning_vlm", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``name`` imports (anywhere in the file, lazy imports included)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lightning_vlm")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("lightning_vlm"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    # A package's own parents run first anyway; they are not edges.
    return {m for m in found if m in modules and not name.startswith(m + ".") and m != name}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else max(LAYERS.values())


def test_imports_only_go_down_the_layers():
    modules = _modules()
    upward = [
        f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
        for name, path in modules.items()
        for dep in _imports(name, path, modules)
        if _layer(dep) > _layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(
                    " -> ".join(stack[stack.index(dep) :] + [node, dep])
                    if dep in stack
                    else f"{node} -> {dep}"
                )
            elif dep not in state:
                visit(dep, [*stack, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "\n".join(cycles)


def test_modules_stay_small():
    sizes = {
        path.relative_to(PACKAGE.parent): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")
    }
    assert not {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert sum(sizes.values()) <= MAX_TOTAL, f"the package has {sum(sizes.values())} lines > {MAX_TOTAL}"


def test_losses_init_only_reexports():
    tree = ast.parse((PACKAGE / "losses" / "__init__.py").read_text())
    kinds = {type(node).__name__ for node in tree.body}
    assert kinds <= {"Expr", "ImportFrom", "Assign"}, kinds
