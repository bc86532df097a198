"""What ``student.path`` / ``teacher.path`` may name besides a directory: a Hub repo id that the local Hugging Face
cache holds (a real cache laid out on disk as huggingface_hub lays it out, read in a fresh process with
HF_HUB_CACHE pointing at it; nothing is downloaded), and a model object given to the Python API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import opd
from opd.models.loading import ModelLoadError, resolve_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo_id: str, checkpoint) -> str:
    """``root`` as a Hugging Face hub cache holding ``checkpoint``'s files as the ``main`` revision of ``repo_id``:
    the files in blobs/ by content hash, the snapshot linking to them, refs/main naming the commit."""
    import hashlib

    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in checkpoint.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    return str(root)


def test_a_repo_id_in_the_local_hub_cache_is_used_and_one_that_is_not_says_how_to_fetch_it(tmp_path, tiny_models):
    cache = hub_cache(tmp_path / "hub", "my-org/tiny-student", tiny_models[1])
    env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "opd", *args], env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    done = run("eval", "my-org/tiny-student", "--task", "arithmetic", "eval.num_prompts=4", "sampling.max_new_tokens=4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["prompts"] == 4
    missing = run("eval", "my-org/not-fetched", "--task", "arithmetic")
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines()[-1] == (
        f"opd: error: student.path: no model at 'my-org/not-fetched': not a local directory, and the Hugging Face cache ({cache}) "
        "holds no snapshot of it; opd never downloads: fetch it beforehand (huggingface-cli download my-org/not-fetched)"
    )


def test_a_teacher_model_object_is_paired_and_used(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    teacher_dir, student_dir = tiny_models
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    summary = opd.train("configs/demo.yaml", ["train.steps=2", "train.prompts_per_step=4", "sampling.max_new_tokens=8", "eval.num_prompts=4",
                                              "eval.every=0", "checkpoint.every=0", "checkpoint.at_end=false", "log.progress_bar=false",
                                              "log.plot=false", "log.tensorboard=false"],
                        student={"path": str(student_dir)}, teacher={"path": teacher}, run={"output_dir": str(tmp_path / "run")})
    assert summary["trained"] and summary["teacher_accuracy"] is not None  # the object sampled and scored as the teacher
    assert not any(p.requires_grad for p in teacher.parameters())  # frozen, as a loaded teacher is
    shutil.rmtree(tmp_path / "run")
    import torch

    with pytest.raises(ModelLoadError, match=r"teacher\.path: the object given for it is a Linear, not a transformers causal LM"):
        opd.train("configs/demo.yaml", ["train.steps=1"], teacher={"path": torch.nn.Linear(2, 2)}, student={"path": str(student_dir)},
                  run={"output_dir": str(tmp_path / "run")})


def test_a_name_that_is_not_a_repo_id_is_refused_as_before():
    with pytest.raises(ModelLoadError, match=r"no model at 'not a repo' \(give a local HF checkpoint directory, a Hub repo id in the local cache"):
        resolve_path("not a repo", "student.path")
