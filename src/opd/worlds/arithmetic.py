"""The embedded world: a character tokenizer and Llama teacher/student checkpoints, trained by opd's own SFT.

``build_world`` writes, under one directory:

    tokenizer/           the character tokenizer (also copied into each model directory)
    teacher/, student/   ordinary HF checkpoints (AutoModelForCausalLM / AutoTokenizer load them)
    student_privileged/  the student's init and SFT budget, half of its examples behind the privileged prompt
                         (reference solution + "Now give your own steps.", then the problem): a student that
                         can be its own OPSD teacher
    teacher_base/        the teacher part-way through its SFT: the "base before the teacher's final
                         training", the reference for G-OPD reward correction
    teacher_bpe/         a teacher of the same shape and SFT budget with a tokenizer of its own: a byte-level BPE
                         learnt from the task's texts, whose tokens span several characters and whose ids match
                         nothing of the character tokenizer's (cross-tokenizer distillation, ``teacher.tokenizer: own``)
    world.json           the spec they were built from and their held-out accuracies

The teacher (~2.7M parameters) is trained until it is nearly perfect on 3-digit addition;
the student (~0.9M) gets a short SFT run that leaves it clearly short of the teacher, so
distillation has something to do. The build is seeded and uses a fixed thread count: on
one machine and torch version it reproduces byte for byte. The package ships the result
(``opd/assets/world``), so nothing is trained at run time; ``opd world build`` regenerates
it into ``$OPD_WORLD_DIR`` or ``~/.cache/opd`` and ``opd world verify`` compares a fresh
build with the shipped files.

This module describes the world (it imports nothing of opd); ``worlds.locate`` finds it and
``worlds.build.arithmetic`` trains it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

WORLD_VERSION = 1

# the arithmetic task's default privileged-prompt instruction (kept here: this module imports nothing of opd)
PRIVILEGED_INSTRUCTION = "Now give your own steps."


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
    # the line after the reference solution in the privileged prompt (``task.privileged_instruction``)
    privileged_instruction: str = PRIVILEGED_INSTRUCTION
    # teacher_bpe: its byte-level BPE's vocabulary (special tokens + 256 bytes + merges), the problems it is learnt
    # from, and the pieces merges stay within. Measured: with GPT-2's split, which merges digits into pairs ("16",
    # "93"), the teacher reached 38.3% after 450 steps; here each digit keeps its own token, fused with the operators
    # after it ("7+", "6,", "3|"): tokens that straddle the student's characters, and a teacher as easy to train
    bpe_vocab_size: int = 400
    bpe_problems: int = 4000
    bpe_pieces: str = r"\d[^\d]*|[^\d]+"

    def fingerprint(self) -> str:
        text = json.dumps({"version": WORLD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def role_fingerprint(self, role: str) -> str:
        """A hash of what one role's training depends on: equal hashes mean the same build inputs.

        ``teacher_base`` is a checkpoint of the teacher's run, so it shares the teacher's.
        """
        fields = _ROLE_FIELDS["teacher" if role == "teacher_base" else role]
        text = json.dumps({"version": WORLD_VERSION, "role": role, **{k: v for k, v in asdict(self).items() if k in fields}}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


_COMMON_FIELDS = ("batch_size", "warmup_steps", "schedule", "digits", "max_positions", "seed", "threads")
_ROLE_FIELDS = {
    "teacher": _COMMON_FIELDS + ("teacher_shape", "teacher_steps", "teacher_lr", "teacher_base_step"),
    "teacher_bpe": _COMMON_FIELDS + ("teacher_shape", "teacher_steps", "teacher_lr", "bpe_vocab_size", "bpe_problems", "bpe_pieces"),
    "student": _COMMON_FIELDS + ("student_shape", "student_steps", "student_lr"),
    "student_privileged": _COMMON_FIELDS
    + ("student_shape", "student_steps", "student_lr", "privileged_fraction", "privileged_instruction"),
}


DEFAULT_SPEC = WorldSpec()


WORLD_MODELS = ("teacher", "student", "teacher_base", "student_privileged", "teacher_bpe")

# the world's parts that a rebuild must reproduce byte for byte
SHIPPED_FILES = ("tokenizer", "teacher", "student", "teacher_base", "student_privileged", "teacher_bpe")
