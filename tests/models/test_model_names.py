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
from conftest import hub_cache

import opd
from opd.models.loading import ModelLoadError, resolve_path

@pytest.mark.slow
def test_a_repo_id_in_the_local_hub_cache_is_used(tmp_path, tiny_models):
    cache = hub_cache(tmp_path / "hub", "my-org/tiny-student", {f.name: f.read_bytes() for f in tiny_models[1].iterdir()})
    env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "opd", "eval", "my-org/tiny-student", "--task", "arithmetic", "eval.num_prompts=4",
                           "sampling.max_new_tokens=4"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["prompts"] == 4


def test_a_repo_id_the_cache_lacks_says_how_to_fetch_it():
    from opd.services.hub import cache_location

    with pytest.raises(ModelLoadError) as err:
        resolve_path("my-org/not-fetched", "student.path")
    assert str(err.value) == (
        f"student.path: no model at 'my-org/not-fetched': not a local directory, and the Hugging Face cache ({cache_location()}) "
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
