"""Shared fixtures: tiny randomly initialised Llama models with the embedded tokenizer."""

from __future__ import annotations

import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from opd.config import load_config
from opd.tokenizer import build_char_tokenizer
from opd.world import ModelShape, WorldSpec
from opd.world_build import init_model

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
