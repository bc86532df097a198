"""A stock vLLM OpenAI-compatible server serving the embedded teacher on loopback, as a user runs it
(``python -m vllm.entrypoints.openai.api_server``), in the vLLM environment's Python (``OPD_VLLM_PYTHON``). It can be
killed and started again on the same port: a served teacher that goes away mid-run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    def __init__(self, model: str, port: int | None = None, name: str = "teacher"):
        self.model, self.port, self.name = model, port or free_port(), name
        self.process: subprocess.Popen | None = None
        self.scratch = tempfile.TemporaryDirectory(prefix="opd-vllm-server-")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> VLLMServer:
        import httpx2

        scratch = self.scratch.name
        env = dict(
            os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=scratch, TORCHINDUCTOR_CACHE_DIR=scratch,
            VLLM_RPC_BASE_PATH=scratch, TMPDIR=scratch, VLLM_NO_USAGE_STATS="1",
        )
        python = os.environ.get("OPD_VLLM_PYTHON", sys.executable)
        command = [
            python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--served-model-name", self.name,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "128", "--enforce-eager",
            "--max-logprobs", "20",
        ]
        self.log = open(Path(scratch) / "server.log", "a")
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the vLLM server exited: " + (Path(scratch) / "server.log").read_text()[-3000:])
            try:
                if httpx2.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx2.HTTPError:
                pass
            time.sleep(1)
        self.kill()
        raise RuntimeError(f"the vLLM server did not come up within {timeout:g} s")

    def kill(self) -> None:
        """SIGKILL the server and everything it started (its engine core): gone at once, as a crashed node is."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None

    def close(self) -> None:
        self.stop()
        self.log.close()
        self.scratch.cleanup()
