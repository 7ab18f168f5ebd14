"""FSDP2: shard an objective's models over the data-parallel mesh, in ``configure_model``.

Lightning's ``ModelParallelStrategy`` builds the device mesh and calls ``configure_model``; the
objective then applies ``fully_shard`` itself (configs/fsdp.yaml). The units are the model's own
``_no_split_modules`` (decoder layers, vision blocks). Our forwards call the inner model and the LM
head directly rather than the ``...ForConditionalGeneration`` wrapper, so those two are the roots:
FSDP2 all-gathers a root's parameters in its own forward, and a root keeps them gathered until the
backward, so a head tied to the input embeddings reads the gathered embedding weight (its own copy is
dropped). Anything trainable left outside (a reward or value head) becomes a unit of its own, so every
gradient is reduced across ranks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_vlm.model.lora import unwrap


def data_parallel_mesh(mesh: Any):
    """The mesh FSDP2 shards over: the data-parallel dimension, with no tensor parallelism."""
    if mesh.mesh_dim_names and "tensor_parallel" in mesh.mesh_dim_names:
        if mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "FSDP2 here shards over data parallelism only: set trainer.strategy.init_args."
                "data_parallel_size to the number of processes and tensor_parallel_size to 1 (configs/fsdp.yaml)"
            )
        return mesh["data_parallel"]
    return mesh


def shard_model(model: nn.Module, mesh: Any) -> None:
    """``fully_shard`` a transformers VLM (or its peft wrapper): units, then the inner model and the head."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    base = unwrap(model)
    if isinstance(base.model, FSDPModule):
        return  # configure_model may run twice
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    units = set(getattr(base, "_no_split_modules", None) or [])
    for module in list(base.modules()):
        if type(module).__name__ in units:
            fully_shard(module, mesh=mesh)
    fully_shard(base.model, mesh=mesh)
    if hasattr(base.model, "get_image_features"):  # vision once calls it directly, not through forward
        register_fsdp_forward_method(base.model, "get_image_features")
        # generate() reads the method's signature to pick its inputs; the wrapper's own (a bound method
        # wrapping a bound method) loses the first one, pixel_values. Give it the class's signature.
        wrapper = base.model.get_image_features.__func__
        wrapper.__signature__ = inspect.signature(type(base.model).get_image_features)
    if tied:
        # fully_shard gave the embeddings a new, sharded parameter; the head still holds the old full
        # one. Drop it and read the embeddings' weight, which the root keeps gathered from its forward
        # until the backward, whenever the head runs (our log-probs and generate() alike).
        del head.weight
        head.forward = lambda x: nn.functional.linear(x, embeddings.weight, head.bias)
    elif head is not None:
        fully_shard(head, mesh=mesh)


def shard_rest(module: nn.Module, mesh: Any) -> None:
    """Make every module that still holds unsharded parameters of its own a unit (heads)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    for sub in list(module.modules()):
        own = list(sub.parameters(recurse=False))
        if own and not any(isinstance(p, DTensor) for p in own):
            fully_shard(sub, mesh=mesh)


def load_sharded(backbones: list, load: Callable[[], None], mesh: Any) -> None:
    """Load and shard every backbone so that only rank 0 ever holds a full copy of the weights.

    Ranks > 0 build the models on the meta device; rank 0 loads the checkpoint. After ``fully_shard``,
    rank 0's full weights are broadcast and each rank keeps its shard (``set_model_state_dict``);
    buffers, which FSDP does not shard (rotary frequencies, ...), are broadcast whole. Idempotent.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if all(bb.model is not None for bb in backbones):
        return
    rank0 = dist.get_rank() == 0
    for bb in backbones:
        bb.on_meta = not rank0
    load()
    models = [m for bb in backbones for m in (bb.model, bb._reference) if m is not None]
    full = [m.state_dict() if rank0 else {} for m in models]  # rank 0: references to the full tensors
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for model, state in zip(models, full, strict=True):
        shard_model(model, mesh)
        if rank0:  # a tied head gave up its own weight in shard_model
            kept = set(model.state_dict())
            state = {k: v for k, v in state.items() if k in kept}
        set_model_state_dict(model, state, options=options)
        _broadcast_buffers(model)


def _broadcast_buffers(model: nn.Module) -> None:
    import torch
    import torch.distributed as dist

    device = dist.distributed_c10d._get_pg_default_device()
    for module in model.modules():
        for name, buf in [(n, b) for n, b in module._buffers.items() if b is not None]:
            real = torch.empty(buf.shape, dtype=buf.dtype, device=device) if buf.is_meta else buf.to(device)
            dist.broadcast(real, src=0)
            module._buffers[name] = real.to(buf.device) if not buf.is_meta else real
