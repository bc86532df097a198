"""Building the embedded arithmetic world: initialise Llama checkpoints and train them with opd's own SFT (the world
itself: ``worlds.arithmetic``)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from ...config.loading import load_config
from ...training.loop import train
from ..arithmetic import DEFAULT_SPEC, SHIPPED_FILES, WorldSpec
from ..locate import world_dir
from ..tokenizer import build_byte_bpe_tokenizer, build_char_tokenizer
from .common import differing_files, earlier_build, init_model, machine, parameter_count, work_directory

log = logging.getLogger(__name__)


def sft_config(
    init_path: Path, output_dir: Path, steps: int, lr: float, spec: WorldSpec, progress: bool, checkpoint_every: int = 0,
    privileged_fraction: float = 0.0,
):
    overrides = {
        "run.name": f"world-{output_dir.name}",
        "run.output_dir": str(output_dir),
        "run.seed": spec.seed,
        "run.overwrite": True,
        "task.min_digits": spec.digits,
        "task.max_digits": spec.digits,
        "student.path": str(init_path),
        "method.name": "sft",
        "method.sft.privileged_fraction": privileged_fraction,
        "task.privileged_instruction": json.dumps(spec.privileged_instruction),
        "train.steps": steps,
        "train.prompts_per_step": spec.batch_size,
        "train.lr": lr,
        "train.warmup_steps": spec.warmup_steps,
        "train.schedule": spec.schedule,
        "train.precision": "fp32",
        "train.threads": spec.threads,
        "sampling.max_new_tokens": 40,
        "eval.every": 0,
        "checkpoint.every": checkpoint_every,
        "checkpoint.keep_last": 1 + steps // checkpoint_every if checkpoint_every else 1,  # the base one survives
        "checkpoint.at_end": False,
        "eval.teacher": False,
        "log.tensorboard": False,
        "log.progress_bar": progress,
        "log.plot": False,
    }
    return load_config(None, [f"{k}={v if v is not None else 'null'}" for k, v in overrides.items()])


def build_world(
    directory: Path | None = None, spec: WorldSpec = DEFAULT_SPEC, progress: bool = True, reuse: Path | None = None
) -> Path:
    """Train the world's teacher and student with opd's SFT and save them under ``directory``.

    With ``reuse`` (an earlier world's directory), a role whose build inputs are unchanged there
    (equal ``WorldSpec.role_fingerprint``) is copied instead of trained again.
    """
    directory = Path(directory or world_dir("arithmetic", spec))
    work = work_directory(directory)
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(work / "tokenizer")
    report = {"spec": asdict(spec), "fingerprint": spec.fingerprint()}
    earlier = _earlier_world(reuse) if reuse else None
    # (name, shape, SFT steps, lr, init seed offset, fraction of privileged-prompt examples, tokenizer)
    roles = [
        ("teacher", spec.teacher_shape, spec.teacher_steps, spec.teacher_lr, 0, 0.0, tokenizer),
        ("student", spec.student_shape, spec.student_steps, spec.student_lr, 1, 0.0, tokenizer),
        ("student_privileged", spec.student_shape, spec.student_steps, spec.student_lr, 1, spec.privileged_fraction, tokenizer),
        ("teacher_bpe", spec.teacher_shape, spec.teacher_steps, spec.teacher_lr, 2, 0.0, None),
    ]
    for role, shape, steps, lr, seed_offset, privileged, role_tokenizer in roles:
        keep_base = role == "teacher" and 0 < spec.teacher_base_step < steps
        fingerprint = spec.role_fingerprint(role)
        if earlier is not None and earlier[1].role_fingerprint(role) == fingerprint and (reuse / role).is_dir():
            for name in (role, "teacher_base") if keep_base else (role,):
                shutil.copytree(reuse / name, work / name)
                report[name] = {**earlier[0].get(name, {}), "fingerprint": fingerprint, "reused_from": earlier[0]["fingerprint"]}
            log.info("world %s: inputs unchanged, copied from %s", role, reuse)
            continue
        init = init_model(work / f"{role}-init", shape, role_tokenizer or bpe_tokenizer(spec), spec, spec.seed + seed_offset)
        checkpoint_every = spec.teacher_base_step if keep_base else 0
        summary = train(sft_config(init, work / f"{role}-sft", steps, lr, spec, progress, checkpoint_every, privileged))
        (work / f"{role}-sft" / "final").rename(work / role)
        if keep_base:
            base = work / f"{role}-sft" / "checkpoints" / f"step-{spec.teacher_base_step:06d}" / "model"
            base.rename(work / "teacher_base")
            report["teacher_base"] = {"sft_steps": spec.teacher_base_step, "fingerprint": fingerprint, "machine": machine()}
        shutil.rmtree(work / f"{role}-sft" / "checkpoints", ignore_errors=True)  # keep only the SFT logs
        shutil.rmtree(init)
        report[role] = {
            "accuracy": summary["student_accuracy_after"], "sft_seconds": summary["wall_seconds"],
            "parameters": parameter_count(work / role), "fingerprint": fingerprint, "machine": machine(),
        }
        log.info("world %s: %.1f%% held-out accuracy after %d SFT steps", role, 100 * report[role]["accuracy"], steps)
    (work / "world.json").write_text(json.dumps(report, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    work.rename(directory)
    return directory


def bpe_tokenizer(spec: WorldSpec):
    """``teacher_bpe``'s tokenizer: a byte-level BPE of ``spec.bpe_vocab_size`` tokens learnt from ``spec.bpe_problems``
    problems of the world's size and their worked solutions (seeded: the same merges on every build), merged within
    ``spec.bpe_pieces``."""
    import random

    from ...tasks.arithmetic import scratchpad

    rng = random.Random(spec.seed)
    low, high = 10 ** (spec.digits - 1) if spec.digits > 1 else 0, 10**spec.digits - 1
    pairs = [(rng.randint(low, high), rng.randint(low, high)) for _ in range(spec.bpe_problems)]
    return build_byte_bpe_tokenizer([text for a, b in pairs for text in (f"{a}+{b}", scratchpad(a, b))], spec.bpe_vocab_size, spec.bpe_pieces)


def _earlier_world(directory: Path) -> tuple[dict, WorldSpec]:
    """An earlier build's report and the spec it was built from."""
    # worlds built before the field had no instruction line
    return earlier_build(directory, WorldSpec, {"privileged_instruction": ""})


def verify_world(reference: Path, spec: WorldSpec = DEFAULT_SPEC, progress: bool = True) -> list[str]:
    """Rebuild the world in a temporary directory; return the files that differ from ``reference``."""
    with tempfile.TemporaryDirectory() as tmp:
        return differing_files(build_world(Path(tmp) / "world", spec, progress), reference, SHIPPED_FILES)
