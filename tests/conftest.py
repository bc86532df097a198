"""Shared fixtures: tiny randomly initialised Llama models with the embedded tokenizer."""

from __future__ import annotations

import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from opd.config.loading import load_config
from opd.models.rollouts import Rollouts, left_pad, right_pad
from opd.worlds.arithmetic import ModelShape, WorldSpec
from opd.worlds.build.common import init_model
from opd.worlds.tokenizer import build_char_tokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))
logging.getLogger("transformers").setLevel(logging.ERROR)

TINY = ModelShape(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2)
TINY_SPEC = WorldSpec(teacher_shape=TINY, student_shape=TINY, max_positions=128)


# the embedded chat template with a tool role (and the tools listed), for multi-turn episodes
TOOL_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] == 'tool' %}<|user|><tool_response>{{ message['content'] }}</tool_response>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def tool_models(tmp_path, tiny_models):
    """Copies of the tiny (teacher, student) behind TOOL_TEMPLATE, with a context long enough for a few turns."""
    import json
    import shutil

    copies = []
    for path in tiny_models:
        copy = tmp_path / f"{path.name}_tools"
        shutil.copytree(path, copy)
        (copy / "chat_template.jinja").write_text(TOOL_TEMPLATE)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
        copies.append(copy)
    return tuple(copies)


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer):
    """Paths of two different tiny random models sharing the char tokenizer: (teacher, student)."""
    root = tmp_path_factory.mktemp("tiny")
    teacher = init_model(root / "teacher", TINY, tokenizer, TINY_SPEC, seed=1)
    student = init_model(root / "student", TINY, tokenizer, TINY_SPEC, seed=2)
    return teacher, student


def make_config(tmp_path, tiny_models, *overrides):
    """A fast config on the tiny models; overrides as key=value strings."""
    teacher, student = tiny_models
    base = [
        f"run.output_dir={tmp_path / 'run'}",
        f"student.path={student}",
        f"teacher.path={teacher}",
        "train.steps=2",
        "train.prompts_per_step=4",
        "train.lr=1e-3",
        "train.precision=fp32",
        "sampling.samples_per_prompt=2",
        "sampling.max_new_tokens=12",
        "eval.every=0",
        "eval.num_prompts=8",
        "eval.teacher=false",
        "checkpoint.every=0",  # the tests that resume ask for checkpoints; the defaults are tested on their own
        "checkpoint.at_end=false",
        "log.progress_bar=false",
        "log.tensorboard=false",
        "log.plot=false",
    ]
    return load_config(None, base + list(overrides))


class Server:
    """A loopback server whose every reply is ``respond(handler)``; records each request's (path, headers, body)."""

    def __init__(self, respond, host="127.0.0.1"):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append((self.path, dict(self.headers), body))
                try:
                    respond(self)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up: what the test wants
                    pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/v1/chat/completions"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class Restartable:
    """A loopback JSON service that can go down — its listening socket closed, so connections are refused — and come
    back on the same port: a real server stopped and restarted. ``answer(path, request) -> reply`` answers each POST;
    ``outage(when, seconds)``: the first request that finds ``when()`` true is dropped unanswered (the service dies
    mid-request), the service stays down ``seconds`` (None: until ``start``), then comes back. Counts what it
    answered (``answered``) and the outages it had."""

    def __init__(self, answer):
        self.answer, self.answered, self.outages = answer, 0, 0
        self.port, self.server, self._when, self._down_s = None, None, None, None
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def outage(self, when, seconds: float | None) -> None:
        self._when, self._down_s = when, seconds

    def start(self) -> "Restartable":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                with outer.lock:
                    down = outer._when is not None and outer._when()
                    if down:
                        outer._when = None
                if down:  # the port is closed before this request is dropped unanswered
                    outer.outages += 1
                    outer.stop()
                    if outer._down_s is not None:
                        threading.Timer(outer._down_s, outer.start).start()
                    self.close_connection = True
                    return
                body = json.dumps(outer.answer(self.path, request)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                outer.answered += 1

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port or 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        with self.lock:
            server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def _go_down(self) -> None:
        import time

        self.stop()
        if self._down_s is not None:
            time.sleep(self._down_s)
            self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


SEARCH = '<tool_call>{"name": "search", "arguments": {"query": "Mirentor founded"}}</tool_call>'


class ScriptedPolicy:
    """A policy that writes given replies (the driver is what is under test): episode i's k-th turn is
    ``scripts[i][k]``, cut at a stop string or at max_new_tokens, EOS added where neither cut it. Records every
    input row it was given, per episode."""

    def __init__(self, tokenizer, prompts: list[list[int]], scripts: list[list[str]]):
        self.tokenizer, self.prompts, self.scripts = tokenizer, prompts, scripts
        self.inputs = [[] for _ in scripts]
        self.eos_ids = [tokenizer.eos_token_id]

    def sample(self, prompts, params, generator=None, stop=()):
        completions = []
        for row in prompts:
            i = next(i for i, p in enumerate(self.prompts) if list(row[: len(p)]) == p)
            self.inputs[i].append(list(row))
            text = self.scripts[i][len(self.inputs[i]) - 1]
            cut = min([text.index(s) + len(s) for s in stop if s in text], default=None)
            ids = self.tokenizer(text[:cut] if cut else text, add_special_tokens=False)["input_ids"]
            if cut is None:
                ids.append(self.tokenizer.eos_token_id)
            completions.append(ids[: params.max_new_tokens])
        prompt_ids, prompt_mask = left_pad(prompts, self.tokenizer.pad_token_id)
        ids_BC, mask_BC = right_pad(completions, self.tokenizer.pad_token_id)
        return Rollouts(prompt_ids, prompt_mask, ids_BC, mask_BC, mask_BC.clone(), torch.full(ids_BC.shape, -0.5) * mask_BC)


def final_weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def killed_at_step(monkeypatch, stop_at: int, run) -> None:
    """Call ``run`` (a training run) with its step ``stop_at`` (0-based) interrupted as by Ctrl-C; the loop is whole
    again afterwards."""
    import opd.training.loop as loop

    real_step = loop.train_step

    def dies(session, optimizer, step):
        if step == stop_at:
            raise KeyboardInterrupt
        return real_step(session, optimizer, step)

    monkeypatch.setattr(loop, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(loop, "train_step", real_step)


def hub_cache(root, repo_id: str, files: dict, repo_type: str = "model") -> str:
    """``root`` as a Hugging Face hub cache holding ``files`` (``{relative path: bytes}``) as the ``main`` revision of
    ``repo_id``, laid out as huggingface_hub lays it out: blobs by content hash, the snapshot's files linking to them,
    refs/main naming the commit. Returns ``root`` (for ``HF_HUB_CACHE``)."""
    import hashlib

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return str(root)
