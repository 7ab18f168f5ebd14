"""Router load-balancing (auxiliary) loss for Mixture-of-Experts backbones.

The backbone keeps only ``last_hidden_state``, so router logits are captured with forward hooks.
Which modules are routers, and which output element holds the logits, comes from the language
model's ``_can_record_outputs["router_logits"]``, the table transformers' own ``output_router_logits``
uses. In Qwen3-VL-MoE: each ``mlp.gate`` (``Qwen3VLMoeTextTopKRouter``), which returns ``(logits,
top-k weights, top-k indices)``; element 0 holds the raw (tokens, experts) logits.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_vlm.model.lora import unwrap


def moe_layout(model: nn.Module) -> tuple[int, int] | None:
    """Experts per MoE layer and experts per token of ``model`` (optionally peft-wrapped), or None if dense."""
    config = unwrap(model).config.get_text_config()
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    return (int(experts), int(top_k)) if experts and top_k else None


def _routers(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """(module to hook, index of the logits in its output) for each router of the language model."""
    from transformers.utils.output_capturing import OutputRecorder

    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base  # not the vision tower
    specs = (getattr(decoder, "_can_record_outputs", None) or {}).get("router_logits", [])
    found = []
    for spec in specs if isinstance(specs, list) else [specs]:
        if isinstance(spec, type):  # a bare class: transformers records output[1]
            spec = OutputRecorder(spec, index=1)
        if not isinstance(spec, OutputRecorder) or spec.target_class is None:  # class names: unsupported
            continue
        for name, module in decoder.named_modules():
            layer = spec.layer_name is None or f".{spec.layer_name.strip('.')}." in f".{name}."
            if isinstance(module, spec.target_class) and layer:
                if name.endswith(".base_layer"):  # a peft LoRA wrapper: its output is the one used
                    module = decoder.get_submodule(name.rsplit(".", 1)[0])
                found.append((module, spec.index))
    return found


@contextlib.contextmanager
def capture_router_logits(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the router logits of every forward pass of ``model`` (a transformers MoE model, optionally
    peft-wrapped) run inside the block; ValueError if its language model has no MoE router.

    Yields a list that fills with one (tokens, experts) tensor per MoE layer per forward pass, in call
    order, still in the graph (the aux loss trains the routers). Forwards that autograd runs during
    backward (activation-checkpoint recomputation) are skipped, so ``backward`` inside the block counts
    nothing twice. Needs non-reentrant checkpointing (the backbone's): reentrant runs the first forward
    without grad. The hooks are removed on exit.
    """
    layout = moe_layout(model)
    routers = _routers(model) if layout else []
    if not routers:
        raise ValueError(f"{type(unwrap(model)).__name__}: no MoE router found in the language model")
    captured: list[torch.Tensor] = []

    def hook(index: int, module: nn.Module, args: tuple, output: Any) -> None:
        if torch._C._current_graph_task_id() != -1:  # inside backward: a checkpoint recomputation
            return
        logits = output[index] if isinstance(output, (tuple, list)) else output
        if logits.shape[-1] != layout[0]:
            raise ValueError(f"{type(module).__name__}: {logits.shape[-1]} router columns, not {layout[0]}")
        captured.append(logits.reshape(-1, logits.shape[-1]))

    handles = [module.register_forward_hook(functools.partial(hook, index)) for module, index in routers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def load_balancing_loss(
    router_logits: list[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, as transformers' ``load_balancing_loss_func`` defines it
    for Mixtral, Qwen3-MoE and Qwen3-VL-MoE, pooled over all layers' tokens: ``num_experts * sum_e f_e *
    P_e``, where ``f_e`` is the share of (token, layer) rows that put expert e in their top-k (so ``sum_e
    f_e = top_k``) and ``P_e`` the mean router probability of e. Perfectly balanced routing gives
    ``top_k``. A float32 scalar; gradients reach the routers through ``P``.

    Args:
        router_logits: (tokens, experts) logits per MoE layer, e.g. from :func:`capture_router_logits`.
        num_experts: Experts per MoE layer.
        top_k: Experts each token is routed to.
        attention_mask: (B, T) 1 on real tokens, with B * T equal to every layer's token count; padding
            rows count towards neither ``f`` nor ``P``.
    """
    if not router_logits:
        raise ValueError("load_balancing_loss: no router logits (no forward inside capture_router_logits?)")
    device = router_logits[0].device
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)
    counts = prob_sum = torch.zeros(num_experts, device=device)  # both updated out of place
    rows = 0.0
    for logits in router_logits:
        probs = logits.to(device).float().softmax(-1)  # (N, E)
        weight = probs.new_ones(probs.shape[0]) if mask is None else mask  # (N,)
        if weight.numel() != probs.shape[0]:
            raise ValueError(f"attention_mask covers {weight.numel()} tokens, router logits {probs.shape[0]}")
        chosen = probs.topk(top_k, dim=-1).indices  # (N, k)
        counts = counts.index_add(0, chosen.reshape(-1), weight.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * weight[:, None]).sum(0)
        rows = rows + weight.sum()
    return num_experts * ((counts / rows) * (prob_sum / rows)).sum()
