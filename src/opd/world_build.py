"""Building the embedded world: initialise Llama checkpoints and train them with opd's own SFT (see ``world``)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .config import load_config
from .tokenizer import build_char_tokenizer
from .train import train
from .world import DEFAULT_SPEC, SHIPPED_FILES, ModelShape, WorldSpec, world_dir

log = logging.getLogger(__name__)


def model_config(shape: ModelShape, tokenizer, max_positions: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def init_model(directory: Path, shape: ModelShape, tokenizer, spec: WorldSpec, seed: int) -> Path:
    """Save a freshly initialised model (and the tokenizer) as a HF checkpoint."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(shape, tokenizer, spec.max_positions))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


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
    directory = Path(directory or world_dir(spec))
    work = directory.with_name(directory.name + f".building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(work / "tokenizer")
    report = {"spec": asdict(spec), "fingerprint": spec.fingerprint()}
    earlier = _earlier_world(reuse) if reuse else None
    # (name, shape, SFT steps, lr, init seed offset, fraction of privileged-prompt examples)
    roles = [
        ("teacher", spec.teacher_shape, spec.teacher_steps, spec.teacher_lr, 0, 0.0),
        ("student", spec.student_shape, spec.student_steps, spec.student_lr, 1, 0.0),
        ("student_privileged", spec.student_shape, spec.student_steps, spec.student_lr, 1, spec.privileged_fraction),
    ]
    for role, shape, steps, lr, seed_offset, privileged in roles:
        keep_base = role == "teacher" and 0 < spec.teacher_base_step < steps
        fingerprint = spec.role_fingerprint(role)
        if earlier is not None and earlier[1].role_fingerprint(role) == fingerprint:
            for name in (role, "teacher_base") if keep_base else (role,):
                shutil.copytree(reuse / name, work / name)
                report[name] = {**earlier[0].get(name, {}), "fingerprint": fingerprint, "reused_from": earlier[0]["fingerprint"]}
            log.info("world %s: inputs unchanged, copied from %s", role, reuse)
            continue
        init = init_model(work / f"{role}-init", shape, tokenizer, spec, spec.seed + seed_offset)
        checkpoint_every = spec.teacher_base_step if keep_base else 0
        summary = train(sft_config(init, work / f"{role}-sft", steps, lr, spec, progress, checkpoint_every, privileged))
        (work / f"{role}-sft" / "final").rename(work / role)
        if keep_base:
            base = work / f"{role}-sft" / "checkpoints" / f"step-{spec.teacher_base_step:06d}" / "model"
            base.rename(work / "teacher_base")
            report["teacher_base"] = {"sft_steps": spec.teacher_base_step, "fingerprint": fingerprint, "machine": _machine()}
        shutil.rmtree(work / f"{role}-sft" / "checkpoints", ignore_errors=True)  # keep only the SFT logs
        shutil.rmtree(init)
        report[role] = {
            "accuracy": summary["student_accuracy_after"], "sft_seconds": summary["wall_seconds"],
            "parameters": _count(work / role), "fingerprint": fingerprint, "machine": _machine(),
        }
        log.info("world %s: %.1f%% held-out accuracy after %d SFT steps", role, 100 * report[role]["accuracy"], steps)
    (work / "world.json").write_text(json.dumps(report, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    work.rename(directory)
    return directory


def _earlier_world(directory: Path) -> tuple[dict, WorldSpec]:
    """An earlier build's report and the spec it was built from."""
    # worlds built before the field had no instruction line
    return earlier_build(directory, WorldSpec, {"privileged_instruction": ""})


def earlier_build(directory: Path, spec_class: type, defaults: dict) -> tuple[dict, object]:
    """An earlier world's report (``world.json``) and the ``spec_class`` it was built from, with ``defaults`` for the
    fields added since (their values then)."""
    marker = Path(directory) / "world.json"
    if not marker.is_file():
        raise ValueError(f"--reuse {directory}: no world.json there (not a built world)")
    report = json.loads(marker.read_text())
    fields = {**defaults, **report["spec"]}
    for shape in ("teacher_shape", "student_shape"):
        fields[shape] = ModelShape(**fields[shape])
    return report, spec_class(**fields)


def _machine() -> str:
    """The CPU a role was trained on: byte-for-byte reproduction holds on the same CPU (and torch version)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        return sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())




def verify_world(reference: Path, spec: WorldSpec = DEFAULT_SPEC, progress: bool = True) -> list[str]:
    """Rebuild the world in a temporary directory; return the files that differ from ``reference``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fresh = build_world(Path(tmp) / "world", spec, progress)
        differing = []
        for name in SHIPPED_FILES:
            for path in sorted((fresh / name).rglob("*")):
                if path.is_file() and path.name != "manifest.json":  # the manifest lists the sizes compared here anyway
                    other = reference / path.relative_to(fresh)
                    if not other.is_file() or other.read_bytes() != path.read_bytes():
                        differing.append(str(path.relative_to(fresh)))
        return differing


def built_elsewhere(reference: Path, differing: list[str]) -> str:
    """Which differing roles were trained on another CPU (where bytes are not expected to match)."""
    report = json.loads((Path(reference) / "world.json").read_text())
    here = _machine()
    roles = sorted({name.split("/", 1)[0] for name in differing} - {"tokenizer"})
    notes = [f"{r} was built on {report.get(r, {}).get('machine', 'an unrecorded CPU')}" for r in roles if report.get(r, {}).get("machine") != here]
    return f"this machine: {here}; " + ("; ".join(notes) if notes else "every differing role was built on this CPU")
