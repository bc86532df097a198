"""Building the embedded code world (``worlds.code``): its rows, then a teacher and a student trained by opd's own SFT
on the reference programs, and two experts — the student's SFT continued on one family's rows alone — for G-OPD's
multi-teacher merge (docs/methods.md). Every model is evaluated by running its greedy programs against the held-out
rows' tests in the sandbox (pass@1, overall and per family)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from ...config.loading import load_config
from ...training.loop import train
from ..code import CODE_WORLD_FILES, DEFAULT_CODE_SPEC, FAMILIES, CodeWorldSpec, code_rows
from ..locate import world_dir
from ..tokenizer import build_char_tokenizer
from .common import differing_files, init_model, machine, parameter_count, work_directory

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 80  # the longest reference completion is 60 characters


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def sft_config(init: Path, output_dir: Path, train_path: Path, eval_path: Path, steps: int, lr: float, spec: CodeWorldSpec, progress: bool):
    overrides = {
        "run.name": f"code-world-{output_dir.name}", "run.output_dir": str(output_dir), "run.seed": spec.seed, "run.overwrite": True,
        "task.name": "code", "task.path": str(train_path), "task.eval_path": str(eval_path), "task.instruction": '""',
        "task.group_field": "family", "student.path": str(init), "method.name": "sft", "train.steps": steps,
        "train.prompts_per_step": spec.batch_size, "train.lr": lr, "train.warmup_steps": spec.warmup_steps,
        "train.schedule": "constant", "train.precision": "fp32", "train.threads": spec.threads,
        "sampling.max_new_tokens": MAX_NEW_TOKENS, "eval.every": 200, "eval.teacher": False, "checkpoint.every": 0,
        "checkpoint.at_end": False, "log.tensorboard": False, "log.progress_bar": progress, "log.plot": False,
    }
    return load_config(None, [f"{k}={v if v is not None else 'null'}" for k, v in overrides.items()])


def family_pass(summary: dict) -> dict:
    """Held-out pass@1 overall and per family, from a run's final evaluation."""
    after = summary["eval_after"]
    return {"pass@1": after["pass@1"], **{f"pass@1_{f}": after[f"pass@1_{f}"] for f in FAMILIES if f"pass@1_{f}" in after}}


def build_code_world(directory: Path | None = None, spec: CodeWorldSpec = DEFAULT_CODE_SPEC, progress: bool = True,
                     reuse: Path | None = None) -> Path:
    """Write the world's rows and train its teacher, student and experts under ``directory`` (a role whose build inputs
    are unchanged in ``reuse``, an earlier build, is copied from there)."""
    directory = Path(directory or world_dir("code", spec))
    work = work_directory(directory)
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(work / "tokenizer")
    train_rows, eval_rows = code_rows(spec)
    write_rows(work / "train.jsonl", train_rows)
    write_rows(work / "eval.jsonl", eval_rows)
    for family in FAMILIES:  # the experts' training rows (not shipped: the family field of train.jsonl says the same)
        write_rows(work / f"train-{family}.jsonl", [r for r in train_rows if r["family"] == family])
    report = {"spec": asdict(spec), "fingerprint": spec.fingerprint()}
    earlier = json.loads((reuse / "world.json").read_text()) if reuse and (reuse / "world.json").is_file() else None
    roles = [("teacher", None, spec.teacher_shape, spec.teacher_steps, spec.lr, work / "train.jsonl", 0),
             ("student", None, spec.student_shape, spec.student_steps, spec.lr, work / "train.jsonl", 1)]
    roles += [(f"expert_{f}", "student", None, spec.expert_steps, spec.expert_lr, work / f"train-{f}.jsonl", 0) for f in FAMILIES]
    for role, starts_from, shape, steps, lr, rows, seed_offset in roles:
        fingerprint = spec.role_fingerprint(role)
        if earlier is not None and earlier.get(role, {}).get("fingerprint") == fingerprint:
            shutil.copytree(reuse / role, work / role)
            report[role] = {**earlier[role], "reused_from": earlier["fingerprint"]}
            log.info("code world %s: inputs unchanged, copied from %s", role, reuse)
            continue
        init = work / starts_from if starts_from else init_model(work / f"{role}-init", shape, tokenizer, spec, spec.seed + seed_offset)
        summary = train(sft_config(init, work / f"{role}-sft", rows, work / "eval.jsonl", steps, lr, spec, progress))
        (work / f"{role}-sft" / "final").rename(work / role)
        shutil.rmtree(work / f"{role}-sft" / "checkpoints", ignore_errors=True)  # keep only the SFT logs
        if not starts_from:
            shutil.rmtree(init)
        report[role] = {
            **family_pass(summary), "sft_steps": steps, "sft_seconds": summary["wall_seconds"], "parameters": parameter_count(work / role),
            "fingerprint": fingerprint, "machine": machine(),
        }
        log.info("code world %s: %.1f%% held-out pass@1 after %d SFT steps", role, 100 * report[role]["pass@1"], steps)
    for family in FAMILIES:
        (work / f"train-{family}.jsonl").unlink()
    (work / "world.json").write_text(json.dumps(report, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    work.rename(directory)
    return directory


def verify_code_world(reference: Path, spec: CodeWorldSpec = DEFAULT_CODE_SPEC, progress: bool = True) -> list[str]:
    """Rebuild the code world in a temporary directory; the files that differ from ``reference``."""
    with tempfile.TemporaryDirectory() as tmp:
        return differing_files(build_code_world(Path(tmp) / "code", spec, progress), reference, CODE_WORLD_FILES)
