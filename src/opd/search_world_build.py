"""Building the embedded search world: its data (``search_world``), then a teacher and a student trained with opd's
own SFT on the scripted tool-using turns (the observations between them are the BM25 search's real results).

The teacher gets ``teacher_steps`` of SFT (then ``teacher_anneal_steps`` more at ``anneal_lr``) and learns to search for the person, read the city off the passage,
search the city for a two-hop question, and answer; the smaller student gets ``student_steps`` of the same and is
left searching badly, so distillation has something to do. Seeded, with a fixed thread count: a rebuild on one
machine and torch version reproduces the files byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from .config import load_config
from .search_world import DEFAULT_SEARCH_SPEC, SEARCH_WORLD_FILES, SearchWorldSpec, search_world_dir, write_data
from .train import train
from .world_build import _count, _machine, init_model

log = logging.getLogger(__name__)


def task_overrides(directory: Path, spec: SearchWorldSpec) -> dict:
    """The ``task`` section that runs the world's questions against its corpus."""
    return {
        "task.name": "search_qa",
        "task.questions": str(directory / "train.jsonl"),
        "task.eval_questions": str(directory / "eval.jsonl"),
        "task.corpus": str(directory / "corpus.jsonl"),
        "task.top_k": spec.top_k,
        "task.max_turns": spec.max_turns,
        "task.max_tokens": spec.max_tokens,
        "task.system_prompt": None,
    }


def sft_config(directory: Path, init: Path, output_dir: Path, steps: int, spec: SearchWorldSpec, progress: bool):
    overrides = {
        **task_overrides(directory, spec),
        "run.name": f"search-world-{output_dir.name}",
        "run.output_dir": str(output_dir),
        "run.seed": spec.seed,
        "run.overwrite": True,
        "student.path": str(init),
        "method.name": "sft",
        "train.steps": steps,
        "train.prompts_per_step": spec.batch_size,
        "train.lr": spec.lr,
        "train.warmup_steps": spec.warmup_steps,
        "train.precision": "fp32",
        "train.threads": spec.threads,
        "sampling.max_new_tokens": 48,
        "eval.every": 0,
        "eval.teacher": False,
        "checkpoint.every": 0,
        "checkpoint.at_end": False,
        "log.tensorboard": False,
        "log.progress_bar": progress,
        "log.plot": False,
    }
    return load_config(None, [f"{k}={json.dumps(v) if v is not None else 'null'}" for k, v in overrides.items()])


def build_search_world(directory: Path | None = None, spec: SearchWorldSpec = DEFAULT_SEARCH_SPEC, progress: bool = True) -> Path:
    """Write the data and train the teacher and the student under ``directory`` (default: where ``search_world_dir``
    looks)."""
    directory = Path(directory or search_world_dir(spec))
    work = directory.with_name(directory.name + f".building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    write_data(work, spec)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    report = {"spec": asdict(spec), "fingerprint": spec.fingerprint()}
    for role, shape, steps, seed_offset in (("teacher", spec.teacher_shape, spec.teacher_steps, 0), ("student", spec.student_shape, spec.student_steps, 1)):
        init = init_model(work / f"{role}-init", shape, tokenizer, spec, spec.seed + seed_offset)
        summary = train(sft_config(work, init, work / f"{role}-sft", steps, spec, progress))
        seconds, final = summary["wall_seconds"], work / f"{role}-sft" / "final"
        if role == "teacher" and spec.teacher_anneal_steps:  # a second stage at a lower learning rate
            anneal = replace(spec, lr=spec.anneal_lr, warmup_steps=0)
            summary = train(sft_config(work, final, work / f"{role}-anneal", spec.teacher_anneal_steps, anneal, progress))
            seconds, final = seconds + summary["wall_seconds"], work / f"{role}-anneal" / "final"
        final.rename(work / role)
        shutil.rmtree(init)
        report[role] = {
            "exact_match": summary["student_accuracy_after"], "f1": summary["eval_after"].get("f1"),
            "tool_calls": summary["eval_after"].get("episode_tool_calls"), "sft_steps": steps + (spec.teacher_anneal_steps if role == "teacher" else 0),
            "sft_seconds": round(seconds, 2), "parameters": _count(work / role), "machine": _machine(),
        }
        log.info("search world %s: %.1f%% held-out exact match after %d SFT steps", role, 100 * summary["student_accuracy_after"], steps)
    (work / "world.json").write_text(json.dumps(report, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    work.rename(directory)
    return directory


def verify_search_world(reference: Path, spec: SearchWorldSpec = DEFAULT_SEARCH_SPEC, progress: bool = True) -> list[str]:
    """Rebuild the search world in a temporary directory; return the files that differ from ``reference``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fresh = build_search_world(Path(tmp) / "search_world", spec, progress)
        differing = []
        for name in SEARCH_WORLD_FILES:
            paths = [fresh / name] if (fresh / name).is_file() else sorted((fresh / name).rglob("*"))
            for path in paths:
                if path.is_file() and path.name != "manifest.json":
                    other = reference / path.relative_to(fresh)
                    if not other.is_file() or other.read_bytes() != path.read_bytes():
                        differing.append(str(path.relative_to(fresh)))
        return differing
