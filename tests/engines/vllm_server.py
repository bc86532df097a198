"""A stock vLLM OpenAI-compatible server on loopback, as a user runs it (``python -m vllm.entrypoints.openai.api_server``),
in the vLLM environment's Python (``OPD_VLLM_PYTHON``), through opd's own ``VLLMProcess``. It can be killed and
started again on the same port: a server that goes away mid-run."""

from __future__ import annotations

import os
from typing import Sequence

from opd.engines.vllm_process import VLLMProcess


class VLLMServer:
    """``model`` served as ``name`` in float32 with a 128-token context; ``args`` and ``env``: more flags and variables
    (a student's server: opd's worker extension, the dev-mode routes)."""

    def __init__(self, model: str, port: int | None = None, name: str = "teacher", args: Sequence[str] = (), env: dict | None = None):
        command = [
            "--model", model, "--served-model-name", name, "--dtype", "float32", "--max-model-len", "128", "--enforce-eager",
            "--max-logprobs", "20", *args,
        ]
        # a server the user runs outlives the thread that started it (tests restart it from a watcher thread)
        self.process = VLLMProcess(command, {"VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}, os.environ.get("OPD_VLLM_PYTHON"), port,
                                   die_with_parent=False)

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def port(self) -> int:
        return self.process.port

    def start(self, timeout: float = 240) -> VLLMServer:
        """Start the server and wait until it answers; a server already running is left as it is."""
        if not self.process.alive():
            self.process.start().wait_ready(timeout)
        return self

    def kill(self) -> None:
        """SIGKILL the server and everything it started (its engine core): gone at once, as a crashed node is."""
        self.process.kill()

    def close(self) -> None:
        self.process.stop()
