"""``sampling.engine: vllm_server``: the student's samples from a vLLM server in a process of its own.

The server runs beside the trainer, on devices of its own: one that opd starts from the student's
checkpoint (``sampling.vllm_server.python``, ``devices``, ``args``), or one the user started
(``sampling.vllm_server.url``) with the flags docs/engines.md lists. Every rank sends its own prompts
(``/v1/completions``, one request per row with its own seed, ``concurrency`` at a time) and gets the
sampled tokens with the server's log-probs of them (``--logprobs-mode processed_logprobs``), as the
in-process ``vllm`` engine does.

After each update the student's weights reach the server through files (``engines.weight_files``):
written as safetensors parts into ``sampling.vllm_server.transfer_dir`` (``/dev/shm``: shared memory),
then loaded in place by the server's workers (``/collective_rpc`` → ``WeightFiles.opd_load_weights``,
the worker extension in ``engines.vllm_worker``), the prefix cache reset. vLLM's own weight-transfer
backends (NCCL, CUDA IPC) need GPUs. A sharded (FSDP) student is gathered one parameter at a time
and written by rank 0. A LoRA student's adapters are loaded as one adapter on the server
(``/v1/load_lora_adapter``, replaced in place at each push), or pushed merged (``W + ΔW``) where the server
cannot take them.

A server that cannot be reached at the start is a one-line error naming its URL. One that stops
answering mid-run stops the run at the step boundary with a checkpoint (exit status 75, as for any
outage, docs/cluster.md); the resumed run starts a server again (or reconnects to the user's) and
pushes the checkpoint's weights before its first step.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Sequence

import torch

from ..config.sections import SamplingConfig, require
from ..models.loading import resolve_path
from ..models.rollouts import Rollouts
from ..parallel.ranks import Ranks
from ..parallel.sharding import is_sharded
from ..services.http import ServiceError, check_url, text_reply
from .base import Engine, Sampler, register_engine
from .served import ServedModel, ServedSampler, check_served_pairing, is_url
from .vllm import engine_lora_rank, engine_weights
from .vllm_process import VLLMProcess
from .weight_files import write_weight_files

log = logging.getLogger(__name__)

SERVED_NAME = "opd-student"
ADAPTER_NAME = "opd-student-adapter"  # the LoRA student's adapters on the server
WORKER_EXTENSION = "opd.engines.vllm_worker.WeightFiles"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class VLLMServerConfig:
    """A vLLM server as the student's engine, section ``sampling.vllm_server`` (docs/engines.md)."""

    url: str | None = None  # a server the user started (with the flags docs/engines.md lists); None = opd starts one
    model: str | None = None  # the served model's name on the user's server; None = the only one it serves
    api_key_env: str | None = None  # the environment variable holding the user's server's API key (never the key)
    # the server opd starts: its Python (an environment with vllm and opd; None = this one), the devices it may use
    # (CUDA_VISIBLE_DEVICES; None = inherited), and further `vllm serve` arguments (e.g. ["--tensor-parallel-size", "4"])
    python: str | None = None
    devices: str | None = None
    args: list[str] = field(default_factory=list)
    # more environment for the server opd starts (e.g. VLLM_CPU_OMP_THREADS_BIND on CPU, NCCL_* on GPUs)
    env: dict[str, str] = field(default_factory=dict)
    cpus: list[int] | None = None  # the CPU cores the server opd starts may run on (None = the trainer's)
    port: int | None = None  # None = a free port on loopback
    startup_seconds: float = 900.0  # how long it may take to load and answer
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = student.dtype
    max_model_len: int | None = None  # None = the student's context length
    gpu_memory_utilization: float = 0.9  # its GPUs are its own
    kv_cache_gb: float | None = None  # None = 1 GiB on CPU, gpu_memory_utilization's rest on GPU
    # the weights after each update: safetensors parts of at most chunk_mb in transfer_dir, which the server must see
    transfer_dir: str = "/dev/shm"
    chunk_mb: float = 1024.0
    deadline: float = 1800.0  # seconds per request (a 16k-token completion, a weight load), everything included
    retries: int = 2  # further attempts after a transient failure
    concurrency: int = 64  # requests in flight at once from each rank
    max_reply_mb: float = 64.0


@register_engine
class VLLMServerEngine(Engine):
    name = "vllm_server"
    config_class = VLLMServerConfig
    takes_stop_strings = True  # the server matches stop strings on its detokenized text
    holds_weights = True
    logprobs = "engine"
    runs_apart = True

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        v = cls.section(cfg)
        if v.url is not None:
            require(is_url(v.url), "sampling.vllm_server.url", f"must be an http(s):// URL, got {v.url!r}")
            try:
                check_url(v.url, with_credentials=v.api_key_env is not None)
            except ServiceError as err:
                require(False, "sampling.vllm_server.url", str(err))
        else:
            require(v.api_key_env is None, "sampling.vllm_server.api_key_env", "is for a server the user started (sampling.vllm_server.url)")
            require(v.model is None, "sampling.vllm_server.model", "is for a server the user started (sampling.vllm_server.url)")
            if v.python is None:
                require(
                    importlib.util.find_spec("vllm") is not None, "sampling.engine",
                    "is 'vllm_server', which starts a vLLM server with this Python, but the vllm package is not installed here "
                    "(pip install vllm; or name an environment that has it, sampling.vllm_server.python; or a running server, "
                    "sampling.vllm_server.url)",
                )
            else:
                require(
                    os.path.isfile(v.python) and os.access(v.python, os.X_OK), "sampling.vllm_server.python",
                    f"is {v.python!r}, which is not an executable file",
                )
        require(v.port is None or 0 < v.port < 65536, "sampling.vllm_server.port", f"must be a TCP port, got {v.port}")
        require(v.startup_seconds > 0, "sampling.vllm_server.startup_seconds", f"must be > 0, got {v.startup_seconds}")
        require(0 < v.gpu_memory_utilization <= 1, "sampling.vllm_server.gpu_memory_utilization", f"must be in (0, 1], got {v.gpu_memory_utilization}")
        require(v.kv_cache_gb is None or v.kv_cache_gb > 0, "sampling.vllm_server.kv_cache_gb", f"must be > 0 or null, got {v.kv_cache_gb}")
        require(v.max_model_len is None or v.max_model_len >= 2, "sampling.vllm_server.max_model_len", f"must be >= 2 or null, got {v.max_model_len}")
        usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        require(
            v.cpus is None or (v.cpus and set(v.cpus) <= set(range(os.cpu_count() or 1))), "sampling.vllm_server.cpus",
            f"must list CPU cores of this machine (0 … {(os.cpu_count() or 1) - 1}; this process may use {sorted(usable)}), got {v.cpus}",
        )
        require(v.chunk_mb > 0, "sampling.vllm_server.chunk_mb", f"must be > 0, got {v.chunk_mb}")
        require(v.deadline > 0, "sampling.vllm_server.deadline", f"must be > 0, got {v.deadline}")
        require(v.retries >= 0, "sampling.vllm_server.retries", f"must be >= 0, got {v.retries}")
        require(v.concurrency >= 1, "sampling.vllm_server.concurrency", f"must be >= 1, got {v.concurrency}")
        require(v.max_reply_mb > 0, "sampling.vllm_server.max_reply_mb", f"must be > 0, got {v.max_reply_mb}")
        require(
            tempfile_dir_usable(v.transfer_dir), "sampling.vllm_server.transfer_dir",
            f"is {v.transfer_dir!r}, which is not a writable directory here; the weights reach the server through it",
        )

    @classmethod
    def build(cls, cfg, student, tokenizer, eos_ids, autocast, device, context) -> Sampler:
        v = cls.section(cfg)
        ranks = current_ranks(device)
        dtype = cfg.student.dtype if v.dtype == "auto" else v.dtype
        lora_rank = cfg.student.lora.r if cfg.student.lora.enabled else None
        process = None
        if v.url is None:
            path = resolve_path(cfg.student.path, "student.path")
            started: list[VLLMProcess] = []

            def start() -> str:  # on rank 0; the others get its URL, or its error
                started.append(start_server(v, path, dtype, context, cfg.run.seed, device, lora_rank))
                return started[0].url

            url = ranks.from_main(start)
            process = started[0] if started else None
            key = "the student's vLLM server" + (f" (its log: {process.log_path})" if process is not None else "")
        else:
            url, key = v.url, "sampling.vllm_server.url"
        client_cfg = SimpleNamespace(
            api_key_env=v.api_key_env, deadline=v.deadline, retries=v.retries, concurrency=v.concurrency, max_reply_mb=v.max_reply_mb,
            model=v.model if v.url is not None else SERVED_NAME, outage="stop", outage_seconds=0.0,  # no waiting: see update_weights
        )
        try:
            served = ServedModel(client_cfg, url, key, keys="sampling.vllm_server.", outage_keys="")
            check_served_pairing(served, tokenizer, tokenizer, cfg.pairing)
        except Exception:
            if process is not None:
                process.stop()
            raise
        return VLLMServerSampler(served, tokenizer, eos_ids, device, ranks, process, v, DTYPES.get(dtype), lora_rank is not None)


def tempfile_dir_usable(directory: str) -> bool:
    try:
        with tempfile.TemporaryDirectory(dir=directory):
            return True
    except OSError:
        return False


def current_ranks(device: torch.device) -> Ranks:
    """This process's ``Ranks`` in the run's process group (one rank when there is none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Ranks(device=device)
    on_cuda = dist.get_backend() == "nccl"
    return Ranks(dist.get_rank(), dist.get_world_size(), device=device if on_cuda else torch.device("cpu"))


def server_arguments(v: VLLMServerConfig, path: str, dtype: str, context: int | None, seed: int, on_cpu: bool,
                     lora_rank: int | None = None) -> list[str]:
    """The ``vllm serve`` arguments of the server opd starts from the student's checkpoint at ``path`` (for a LoRA
    student of rank ``lora_rank``: LoRA enabled, one adapter, the smallest rank vLLM accepts that holds it)."""
    args = [
        "--model", path, "--served-model-name", SERVED_NAME, "--dtype", dtype, "--seed", str(seed),
        "--logprobs-mode", "processed_logprobs", "--worker-extension-cls", WORKER_EXTENSION,
        "--gpu-memory-utilization", str(v.gpu_memory_utilization), "--disable-log-stats",
    ]
    if v.max_model_len or context:
        args += ["--max-model-len", str(v.max_model_len or context)]
    if lora_rank is not None:
        args += ["--enable-lora", "--max-lora-rank", str(engine_lora_rank(lora_rank)), "--max-loras", "1"]
    if on_cpu:
        args.append("--enforce-eager")
    elif v.kv_cache_gb is not None:
        args += ["--kv-cache-memory-bytes", str(int(v.kv_cache_gb * (1 << 30)))]
    return args + list(v.args)


def start_server(v: VLLMServerConfig, path: str, dtype: str, context: int | None, seed: int, device: torch.device,
                 lora_rank: int | None = None) -> VLLMProcess:
    """Start the student's server and wait until it answers (``ServiceError`` naming its log otherwise)."""
    on_cpu = device.type == "cpu"
    env = {"VLLM_SERVER_DEV_MODE": "1"}  # the /collective_rpc and /reset_prefix_cache routes the weight push uses
    if lora_rank is not None:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # /v1/load_lora_adapter, for the adapters' pushes
    if v.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = v.devices
    if on_cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{v.kv_cache_gb or 1.0:g}"
    env.update({str(k): str(value) for k, value in v.env.items()})
    process = VLLMProcess(server_arguments(v, path, dtype, context, seed, on_cpu, lora_rank), env, v.python, v.port, v.cpus).start()
    log.info("sampling.engine=vllm_server: starting the student's vLLM server on %s (log: %s)", process.url, process.log_path)
    started = time.monotonic()
    try:
        process.wait_ready(v.startup_seconds)
    except RuntimeError as err:
        process.stop()
        raise ServiceError(f"sampling.engine=vllm_server: {err}") from None
    log.info("sampling.engine=vllm_server: the server answered after %.0f s", time.monotonic() - started)
    return process


def remove_orphaned_pushes(transfer_dir: str) -> None:
    """Remove the weight files a trainer killed mid-push left in ``transfer_dir`` (in ``/dev/shm`` they hold memory
    until removed): the directories named after a process that no longer exists."""
    for entry in Path(transfer_dir).glob("opd-[wa][ed][ia]*-*-*"):
        parts = entry.name.split("-")
        if len(parts) < 4 or parts[1] not in ("weights", "adapter") or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
            log.info("sampling.vllm_server: removed %s, left by a trainer that is gone", entry)
        except PermissionError:  # another user's process: alive
            pass


class VLLMServerSampler(Sampler):
    """``Sampler`` over a vLLM server: sampling by ``ServedSampler``, weights pushed through files."""

    def __init__(self, served: ServedModel, tokenizer, eos_ids: Sequence[int], device: torch.device, ranks: Ranks,
                 process: VLLMProcess | None, cfg: VLLMServerConfig, dtype: torch.dtype | None, lora: bool = False):
        self.served, self.ranks, self.process, self.cfg, self.dtype = served, ranks, process, cfg, dtype
        self.sampler = ServedSampler(served, tokenizer, eos_ids, device)
        self.eos_ids = self.sampler.eos_ids
        self.pushes, self.pushed_bytes, self.push_seconds = 0, 0, 0.0
        # "adapter": a LoRA student's adapters loaded into the server as one adapter, replaced in place at each push
        self.push_kind = "adapter" if lora else "merged"
        self._adapter_dir: str | None = None  # the files of the adapter the server holds (kept until replaced)
        if ranks.main:
            remove_orphaned_pushes(cfg.transfer_dir)

    def sample(
        self, prompts: Sequence[Sequence[int]], params: SamplingConfig, generator: torch.Generator | None = None, stop: Sequence[str] = (),
    ) -> Rollouts:
        return self.sampler.sample(prompts, params, generator, stop)

    def update_weights(self, model: torch.nn.Module) -> None:
        """Push ``model``'s weights to the server: every rank takes part in gathering a sharded model; rank 0 writes the
        files and has the server load them; every rank returns once the server samples from them (a failure is
        raised on every rank, a ``ServiceOutage`` when the server stopped answering)."""
        started = time.monotonic()
        if not self.ranks.main and is_sharded(model):  # its part of gathering each parameter for rank 0
            for _ in engine_weights(model):
                pass
        self.pushed_bytes = self.ranks.from_main(lambda: self._push(model))
        self.pushes += 1
        self.push_seconds += time.monotonic() - started

    def _push(self, model: torch.nn.Module) -> int:
        """Write the weights (a LoRA student's adapters, where the server takes them), have the server load them,
        reset its prefix cache; the bytes written."""
        if self.push_kind == "adapter" and (written := self._push_adapter(model)) is not None:
            self.served.post("/reset_prefix_cache", {})  # cached keys and values belong to the old adapter
            return written
        directory = tempfile.mkdtemp(prefix=f"opd-weights-{os.getpid()}-", dir=self.cfg.transfer_dir)
        try:
            with torch.no_grad():
                _, written = write_weight_files(engine_weights(model), directory, self.dtype, self.cfg.chunk_mb)
            reply = self.served.post("/collective_rpc", {"method": "opd_load_weights", "kwargs": {"directory": directory}})
            loaded = reply.get("results") if isinstance(reply, dict) else None
            if not isinstance(loaded, list) or not loaded or any(not str(n).isdigit() or int(n) == 0 for n in loaded):  # (the route sends str(result))
                raise ServiceError(
                    f"{self.served.key}: the server did not load the pushed weights (reply {str(reply)[:200]}); it needs opd's worker "
                    f"extension (--worker-extension-cls {WORKER_EXTENSION}) and VLLM_SERVER_DEV_MODE=1 (docs/engines.md)"
                )
            self.served.post("/reset_prefix_cache", {})  # cached keys and values belong to the old weights
            return written
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _push_adapter(self, model: torch.nn.Module) -> int | None:
        """Save the student's LoRA adapters into ``transfer_dir`` and have the server load them in place of the last
        ones (``/v1/load_lora_adapter``); sample with them from now on. None (and merged pushes from now on, logged)
        where the server cannot take them: a student with modules trained whole beside its adapters, or a server
        without runtime LoRA loading (``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``)."""
        config = getattr(model, "peft_config", {}).get("default")
        if config is None or getattr(config, "modules_to_save", None):
            return self._merged_from_now("the student has no LoRA adapters alone to push")
        directory = tempfile.mkdtemp(prefix=f"opd-adapter-{os.getpid()}-", dir=self.cfg.transfer_dir)
        model.save_pretrained(directory)
        try:
            self.served.post("/v1/load_lora_adapter", {"lora_name": ADAPTER_NAME, "lora_path": directory, "load_inplace": True}, text_reply)
        except ServiceError as err:
            shutil.rmtree(directory, ignore_errors=True)
            if err.unavailable:  # the server is gone, not unwilling
                raise
            return self._merged_from_now(str(err).splitlines()[0][:300])
        if self._adapter_dir is not None:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)
        self._adapter_dir, self.served.name = directory, ADAPTER_NAME
        return sum(f.stat().st_size for f in Path(directory).iterdir() if f.is_file())

    def _merged_from_now(self, why: str) -> None:
        log.warning("sampling.engine=vllm_server: pushing the student's adapters merged from now on (%s)", why)
        self.push_kind = "merged"
        return None

    def close(self) -> None:
        if self._adapter_dir is not None:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)
        self.served.close()
        if self.process is not None:
            self.process.stop()
            self.process = None
