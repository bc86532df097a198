"""Out of memory and a full disk part-way through a run, met for real: a child process under an operating-system limit
that starts at a chosen step (``tests/limited.py``: ``RLIMIT_AS``, ``RLIMIT_FSIZE``, or a tmpfs filled up). Each ends in
one line naming what ran out and what to change, leaves the newest checkpoint intact, and ``--resume`` (without the
limit) ends with the weights of a run that never met it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import final_weights

from opd.training.checkpoints import checkpoint_problem
from opd.training.errors import OutOfMemory
from opd.training.profiling import PhaseTimer

LIMITED = Path(__file__).resolve().parents[1] / "limited.py"


def base_args(tiny_models, run: Path, *extra) -> list[str]:
    teacher, student = tiny_models
    return [
        f"run.output_dir={run}", f"student.path={student}", f"teacher.path={teacher}", "train.lr=1e-3", "train.precision=fp32",
        "sampling.samples_per_prompt=2", "sampling.max_new_tokens=12", "eval.every=0", "eval.num_prompts=8", "eval.teacher=false",
        "log.progress_bar=false", "log.tensorboard=false", "log.plot=false", "train.threads=1", *extra,
    ]


def env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}


def config_file(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("run: {name: limited}\n")
    return path


def limited(tmp_path, when: str, limit: str, amount: int, args: list[str]) -> subprocess.CompletedProcess:
    # glibc hands large blocks back to the system when they are freed (else memory the first steps freed stays mapped
    # and a later step reuses it without meeting the address-space limit)
    child_env = {**env(), "MALLOC_MMAP_THRESHOLD_": "65536"}
    return subprocess.run([sys.executable, str(LIMITED), when, limit, str(amount), str(config_file(tmp_path)), *args],
                          env=child_env, capture_output=True, text=True, timeout=600)


def opd_train(tmp_path, args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "opd", "train", str(config_file(tmp_path)), *args], env=env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def the_one_line(done: subprocess.CompletedProcess) -> str:
    """The run's report: exit status 2, no traceback, one 'opd:' line."""
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("opd:")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def same_weights(a: Path, b: Path) -> bool:
    expected, weights = final_weights(a), final_weights(b)
    return all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_out_of_memory_in_a_step_names_the_phase_and_keys_and_the_checkpoint_resumes_exactly(tmp_path, tiny_models):
    """SFT on 2048 rows a step; from step 3 on the address space may grow by 8 MiB only: the student's backward cannot
    allocate. The checkpoint of step 2 is intact, and the resumed run ends as the run that had the memory."""
    args = lambda run: base_args(tiny_models, run, "method.name=sft", "train.steps=3", "train.prompts_per_step=2048", "checkpoint.every=2")  # noqa: E731
    run = tmp_path / "run"
    line = the_one_line(limited(tmp_path, "step:2", "as", 8, args(run)))
    assert line.startswith("opd: error: out of memory in the student's forward and backward (phase 'student') at step 3: DefaultCPUAllocator")
    assert "to use less: train.micro_batch_tokens, train.gradient_checkpointing=true" in line
    assert "checkpoint step-000002 is intact (--resume, with train.micro_batch_tokens, train.gradient_checkpointing" in line
    assert checkpoint_problem(run / "checkpoints" / "step-000002") is None and not (run / "final").exists()
    opd_train(tmp_path, [*args(run), "--resume"])
    opd_train(tmp_path, args(tmp_path / "whole"))
    assert same_weights(tmp_path / "whole", run)


def tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("full", ["file size limit", "filled tmpfs"])
def test_a_full_disk_while_checkpointing_is_one_line_and_the_previous_checkpoint_resumes_exactly(full, tmp_path, tiny_models):
    disk = tmp_path / "disk"
    if full == "filled tmpfs":
        if not tmpfs(disk, "8m"):
            pytest.skip("this machine lets no test mount a tmpfs (not root); the file size limit covers the same code")
        limit, amount = f"fill:{disk}", 64  # all of its space but 64 KiB: metrics rows fit, a checkpoint does not
    else:
        disk.mkdir()
        limit, amount = "fsize", 40  # no file past 40 KiB: the student's weights are 100 KiB
    try:
        run = disk / "run"
        args = base_args(tiny_models, run, "train.steps=4", "checkpoint.every=2")
        line = the_one_line(limited(tmp_path, "step:2", limit, amount, args))
        assert line.startswith(f"opd: error: cannot write checkpoint {run}/checkpoints/step-000004: ")
        cause = "no space left on the device" if full == "filled tmpfs" else "a file grew past the size this process may write"
        assert cause in line and line.endswith("the previous checkpoint, step-000002, is intact (free space, then --resume)")
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]  # the unfinished one removed
        assert checkpoint_problem(run / "checkpoints" / "step-000002") is None
        (disk / "filler").unlink(missing_ok=True)
        opd_train(tmp_path, [*args, "--resume"])
        opd_train(tmp_path, base_args(tiny_models, tmp_path / "whole", "train.steps=4", "checkpoint.every=2"))
        assert same_weights(tmp_path / "whole", run)
    finally:
        if full == "filled tmpfs":
            subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_while_writing_the_final_model_is_one_line_and_resume_writes_it(tmp_path, tiny_models):
    run = tmp_path / "run"
    args = base_args(tiny_models, run, "train.steps=2", "checkpoint.every=0")  # checkpoint.at_end keeps step 2
    line = the_one_line(limited(tmp_path, "final", "fsize", 40, args))
    assert line.startswith(f"opd: error: cannot write the final model to {run}/final: a file grew past the size")
    assert not (run / "final").exists() and not (run / "final.tmp").exists()
    opd_train(tmp_path, [*args, "--resume"])
    opd_train(tmp_path, base_args(tiny_models, tmp_path / "whole", "train.steps=2", "checkpoint.every=0"))
    assert same_weights(tmp_path / "whole", run)


def test_a_cuda_out_of_memory_names_the_phase_it_happened_in_and_its_keys(tmp_path):
    """The message a GPU run gets: the phase the error left (here the teacher's scoring, inside the student phase)."""
    from types import SimpleNamespace

    from opd.training.loop import memory_named

    s = SimpleNamespace(timer=PhaseTimer())
    (tmp_path / "checkpoints" / "step-000040").mkdir(parents=True)
    with pytest.raises(OutOfMemory) as raised:
        with memory_named(s, tmp_path, 41):
            with s.timer.phase("student"), s.timer.phase("teacher"):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB")
    message = str(raised.value)
    assert message.startswith("out of memory in teacher scoring (phase 'teacher') at step 41: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "teacher.dtype=bfloat16" in message and "checkpoint step-000040 is intact" in message and "\n" not in message
    with pytest.raises(ValueError, match="not memory"):  # anything else passes through as it was
        with memory_named(s, tmp_path, 41):
            raise ValueError("not memory")


def test_write_failures_read_the_same_from_the_os_and_from_safetensors():
    import errno

    from safetensors import SafetensorError

    from opd.training.checkpoints import write_failure

    full = "no space left on the device (or the disk quota is used up)"
    assert write_failure(OSError(errno.ENOSPC, "No space left on device")) == full
    assert write_failure(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")) == full
    assert write_failure(OSError(errno.EFBIG, "File too large")).startswith("a file grew past the size")
    assert write_failure(OSError(errno.EACCES, "Permission denied")) == "Permission denied"
