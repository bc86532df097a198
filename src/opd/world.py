"""The embedded world: a character tokenizer and Llama teacher/student checkpoints, trained by opd's own SFT.

``build_world`` writes, under one directory:

    tokenizer/           the character tokenizer (also copied into each model directory)
    teacher/, student/   ordinary HF checkpoints (AutoModelForCausalLM / AutoTokenizer load them)
    student_privileged/  the student's init and SFT budget, half of its examples behind the privileged prompt
                         (problem + reference solution): a student that can be its own OPSD teacher
    teacher_base/        the teacher part-way through its SFT: the "base before the teacher's final
                         training", the reference for G-OPD reward correction
    world.json           the spec they were built from and their held-out accuracies

The teacher (~2.7M parameters) is trained until it is nearly perfect on 3-digit addition;
the student (~0.9M) gets a short SFT run that leaves it clearly short of the teacher, so
distillation has something to do. The build is seeded and uses a fixed thread count: on
one machine and torch version it reproduces byte for byte. The package ships the result
(``opd/assets/world``), so nothing is trained at run time; ``opd world build`` regenerates
it into ``$OPD_WORLD_DIR`` or ``~/.cache/opd`` and ``opd world verify`` compares a fresh
build with the shipped files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .tokenizer import build_char_tokenizer

log = logging.getLogger(__name__)

WORLD_VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int


@dataclass(frozen=True)
class WorldSpec:
    teacher_shape: ModelShape = ModelShape(192, 6, 512, 6)
    student_shape: ModelShape = ModelShape(128, 4, 384, 4)
    teacher_steps: int = 450
    student_steps: int = 250
    batch_size: int = 64
    teacher_lr: float = 1.5e-3
    student_lr: float = 1.5e-3
    warmup_steps: int = 20
    schedule: str = "constant"  # measured: cosine decay stalls these small models before they learn the carries
    digits: int = 3
    max_positions: int = 128
    seed: int = 0
    threads: int | None = 2  # fixed so the build is reproducible bit for bit on one machine
    teacher_base_step: int = 300  # the teacher's SFT checkpoint kept as "teacher_base" (its pre-final-training base)
    # student_privileged: the student's init and SFT budget, with this fraction of examples shown behind their
    # privileged prompt (problem + reference solution), so that it can be its own OPSD teacher
    privileged_fraction: float = 0.5

    def fingerprint(self) -> str:
        text = json.dumps({"version": WORLD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


DEFAULT_SPEC = WorldSpec()


SHIPPED_WORLD = Path(__file__).parent / "assets" / "world"


def shipped_world(spec: WorldSpec = DEFAULT_SPEC) -> Path | None:
    """The world shipped inside the package, when it was built from ``spec``."""
    marker = SHIPPED_WORLD / "world.json"
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == spec.fingerprint():
        return SHIPPED_WORLD
    return None


def cache_dir(spec: WorldSpec = DEFAULT_SPEC) -> Path:
    root = Path(os.environ.get("OPD_WORLD_DIR") or Path.home() / ".cache" / "opd")
    return root / f"world-{spec.fingerprint()}"


def world_dir(spec: WorldSpec = DEFAULT_SPEC) -> Path:
    """Where the world is read from: ``$OPD_WORLD_DIR`` if set, else the shipped copy, else the user cache."""
    if not os.environ.get("OPD_WORLD_DIR") and shipped_world(spec) is not None:
        return SHIPPED_WORLD
    return cache_dir(spec)


WORLD_MODELS = ("teacher", "student", "teacher_base", "student_privileged")


def world_model_path(name: str, spec: WorldSpec = DEFAULT_SPEC) -> Path:
    """Directory of one of the world's models (``WORLD_MODELS``), building the world first if it is missing."""
    if name not in WORLD_MODELS:
        raise ValueError(f"unknown world model '{name}' (choose world:{', world:'.join(WORLD_MODELS)})")
    directory = world_dir(spec)
    if not (directory / "world.json").is_file():
        log.warning("embedded world not found at %s; building it (a few minutes, once)", directory)
        build_world(directory, spec)
    return directory / name


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
    from .config import load_config

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
        "checkpoint.keep_last": 1,
        "eval.teacher": False,
        "log.tensorboard": False,
        "log.progress_bar": progress,
        "log.plot": False,
    }
    return load_config(None, [f"{k}={v if v is not None else 'null'}" for k, v in overrides.items()])


def build_world(directory: Path | None = None, spec: WorldSpec = DEFAULT_SPEC, progress: bool = True) -> Path:
    """Train the world's teacher and student with opd's SFT and save them under ``directory``."""
    from .train import train

    directory = Path(directory or world_dir(spec))
    work = directory.with_name(directory.name + f".building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(work / "tokenizer")
    report = {"spec": asdict(spec), "fingerprint": spec.fingerprint()}
    # (name, shape, SFT steps, lr, init seed offset, fraction of privileged-prompt examples)
    roles = [
        ("teacher", spec.teacher_shape, spec.teacher_steps, spec.teacher_lr, 0, 0.0),
        ("student", spec.student_shape, spec.student_steps, spec.student_lr, 1, 0.0),
        ("student_privileged", spec.student_shape, spec.student_steps, spec.student_lr, 1, spec.privileged_fraction),
    ]
    for role, shape, steps, lr, seed_offset, privileged in roles:
        init = init_model(work / f"{role}-init", shape, tokenizer, spec, spec.seed + seed_offset)
        keep_base = role == "teacher" and 0 < spec.teacher_base_step < steps
        checkpoint_every = spec.teacher_base_step if keep_base else 0
        summary = train(sft_config(init, work / f"{role}-sft", steps, lr, spec, progress, checkpoint_every, privileged))
        (work / f"{role}-sft" / "final").rename(work / role)
        if keep_base:
            base = work / f"{role}-sft" / "checkpoints" / f"step-{spec.teacher_base_step:06d}" / "model"
            base.rename(work / "teacher_base")
            report["teacher_base"] = {"sft_steps": spec.teacher_base_step}
        shutil.rmtree(work / f"{role}-sft" / "checkpoints", ignore_errors=True)  # keep only the SFT logs
        shutil.rmtree(init)
        report[role] = {"accuracy": summary["student_accuracy_after"], "sft_seconds": summary["wall_seconds"], "parameters": _count(work / role)}
        log.info("world %s: %.1f%% held-out accuracy after %d SFT steps", role, 100 * report[role]["accuracy"], steps)
    (work / "world.json").write_text(json.dumps(report, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    work.rename(directory)
    return directory


def _count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        return sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())


SHIPPED_FILES = ("tokenizer", "teacher", "student", "teacher_base", "student_privileged")


def verify_world(reference: Path, spec: WorldSpec = DEFAULT_SPEC, progress: bool = True) -> list[str]:
    """Rebuild the world in a temporary directory; return the files that differ from ``reference``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fresh = build_world(Path(tmp) / "world", spec, progress)
        differing = []
        for name in SHIPPED_FILES:
            for path in sorted((fresh / name).rglob("*")):
                if path.is_file():
                    other = reference / path.relative_to(fresh)
                    if not other.is_file() or other.read_bytes() != path.read_bytes():
                        differing.append(str(path.relative_to(fresh)))
        return differing
