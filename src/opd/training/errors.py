"""The error that stops a training run that cannot go on (too many non-finite steps in a row, a student with nothing
to train, a context with no room for a prompt): one line, printed by the command line. Which errors are the
user's (one line, no traceback), and how a rank whose failure stops the others reports it before they go."""

from __future__ import annotations

import sys
import traceback


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class OutOfMemory(TrainingError):
    """A step (or an evaluation, a checkpoint) ran out of device or host memory: one line naming the phase and the keys
    that make it smaller (``out_of_memory``)."""


# per phase of a step (training.profiling's names, and the loop's own), the keys that make it need less memory
MEMORY_KEYS = {
    "sample": "sampling.max_new_tokens, sampling.samples_per_prompt, train.grad_accum (fewer rows sampled at once)",
    "teacher": "train.micro_batch_tokens, teacher.dtype=bfloat16, teacher.device (another GPU)",
    "judge": "train.grad_accum (fewer rows judged at once), teacher.dtype=bfloat16",
    "student": "train.micro_batch_tokens, train.gradient_checkpointing=true, train.precision=bf16, student.lora.enabled=true, "
    "train.sharding=fsdp (several ranks)",
    "reduce": "train.sharding=fsdp, student.lora.enabled=true",
    "optimizer": "train.sharding=fsdp (several ranks), student.lora.enabled=true",
    "sync": "sampling.sync_every (fewer weight pushes), the engine's own memory share",
    "evaluation": "eval.batch_size, eval.max_new_tokens",
    "checkpoint": "train.sharding=fsdp (the whole state is gathered in host memory to be written)",
}
WHAT = {"sample": "sampling", "teacher": "teacher scoring", "judge": "judging", "student": "the student's forward and backward",
        "reduce": "the gradient all-reduce", "optimizer": "the optimizer step", "sync": "pushing weights to the engine"}
RESUMABLE_MEMORY_KEYS = "train.micro_batch_tokens, train.gradient_checkpointing, train.sharding and eval.*"  # resume.py lets these change


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA (``torch.OutOfMemoryError``) or host (torch's CPU allocator, Python's ``MemoryError``) allocation failure."""
    import torch

    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


def out_of_memory(err: BaseException, phase: str, step: int, checkpoint: str | None) -> OutOfMemory:
    """The one line for ``err`` in ``phase`` of step ``step`` (1-based), naming what to lower and the checkpoint that
    holds the run so far."""
    detail = " ".join(str(err).split())
    detail = detail[detail.find("DefaultCPUAllocator") :] if "DefaultCPUAllocator" in detail else detail
    kept = f"checkpoint {checkpoint} is intact (--resume" if checkpoint else "no checkpoint was written yet (run again"
    return OutOfMemory(
        f"out of memory in {WHAT.get(phase, phase)} (phase '{phase}') at step {step}: {detail[:200]}; to use less: "
        f"{MEMORY_KEYS.get(phase, 'train.micro_batch_tokens, train.gradient_checkpointing=true')}; {kept}, with "
        f"{RESUMABLE_MEMORY_KEYS} free to change; the rest need run.allow_changes=true)"
    )


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that are a user's mistake or a service's answer: printed as one line, never as a traceback."""
    from ..config.sections import ConfigError
    from ..models.loading import ModelLoadError
    from ..models.pairing import PairingError
    from ..models.prompts import PromptError
    from ..services.http import ServiceError
    from ..tasks.rows import DataError
    from ..teachers.judges import JudgeError
    from .checkpoints import CheckpointError
    from .resume import RunDirError
    from .run_lock import RunDirBusy

    return (ConfigError, ModelLoadError, PairingError, DataError, PromptError, RunDirError, RunDirBusy, TrainingError, JudgeError,
            ServiceError, CheckpointError)


def report_failure(err: Exception, rank: int) -> None:
    """Print ``err`` now, as the command line would (one line for a user error, else its traceback), naming ``rank``:
    a rank whose failure is about to stop the others speaks before they are gone. Marks it ``reported``."""
    where = "" if rank == 0 else f" (rank {rank})"
    if isinstance(err, user_errors()):
        print(f"opd: error{where}: {err}", file=sys.stderr, flush=True)
    else:
        print(f"opd: rank {rank} failed:", file=sys.stderr)
        traceback.print_exception(err, file=sys.stderr)
        sys.stderr.flush()
    err.reported = True
