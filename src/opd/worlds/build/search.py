"""Building the embedded search world: its data (``search_world``), then a teacher and a student trained with opd's
own SFT on the scripted tool-using turns (the observations between them are the BM25 search's real results).

The teacher gets ``teacher_steps`` of SFT (then ``teacher_anneal_steps`` more at ``anneal_lr``) and learns to search for
the person, read the city off the passage, search the city for a two-hop question, and answer. The smaller student gets
``student_steps`` of SFT (then ``student_anneal_steps`` at ``anneal_lr``) on its own scripts (``student_scripts``: the
teacher's, or with ``student_second_search`` < 1 mostly stopping one search early), and is left searching badly, so
distillation has something to do. Seeded, with a fixed thread count: a rebuild on one
machine and torch version reproduces the files byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from ...config.loading import load_config
from ...episodes.tool_calls import parse_tool_calls
from ...training.loop import train
from ..locate import world_dir
from ..search import DEFAULT_SEARCH_SPEC, SEARCH_WORLD_FILES, SearchWorldSpec, write_data
from .common import differing_files, earlier_build, init_model, machine, parameter_count

log = logging.getLogger(__name__)
STUDENT_SCRIPTS = "student_train.jsonl"  # the student's scripts, written for its SFT and removed after


def student_scripts(rows: list[dict], spec: SearchWorldSpec) -> list[dict]:
    """The student's SFT rows: the training rows, where a two-hop row keeps its second search with probability
    ``spec.student_second_search`` and otherwise answers with the city its first search found (the bridge, not the
    country asked for). Single-hop rows, the order and every row's ``answers`` are unchanged; at 1.0 the student
    learns the teacher's scripts."""
    rng = random.Random(f"opd-search-student-{spec.seed}")
    out = []
    for row in rows:
        if row["hops"] == 2 and rng.random() >= spec.student_second_search:
            city = parse_tool_calls(row["turns"][1]).calls[0].arguments["query"]
            row = {**row, "turns": [row["turns"][0], f"Answer: {city}"]}
        out.append(row)
    return out


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


def sft_config(directory: Path, init: Path, output_dir: Path, steps: int, spec: SearchWorldSpec, progress: bool, questions: str = "train.jsonl"):
    """SFT of ``init`` on the scripted turns of ``directory / questions`` (the student's own scripts for the student)."""
    overrides = {
        **task_overrides(directory, spec),
        "task.questions": str(directory / questions),
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


def build_search_world(
    directory: Path | None = None, spec: SearchWorldSpec = DEFAULT_SEARCH_SPEC, progress: bool = True, reuse: Path | None = None
) -> Path:
    """Write the data and train the teacher and the student under ``directory`` (default: where ``worlds.locate.world_dir``
    looks). The teacher learns the full scripts; the student learns its own (``student_scripts``: mostly one search
    where two are needed). With ``reuse`` (an earlier search world), a role whose build inputs are unchanged there
    (equal ``SearchWorldSpec.role_fingerprint``) is copied instead of trained again."""
    directory = Path(directory or world_dir("search", spec))
    work = directory.with_name(directory.name + f".building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    write_data(work, spec)
    rows = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    (work / STUDENT_SCRIPTS).write_text("".join(json.dumps(row) + "\n" for row in student_scripts(rows, spec)))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    report = {"spec": asdict(spec), "fingerprint": spec.fingerprint()}
    earlier = _earlier_search_world(Path(reuse)) if reuse else None
    roles = (
        ("teacher", spec.teacher_shape, spec.teacher_steps, spec.teacher_anneal_steps, 0, "train.jsonl"),
        ("student", spec.student_shape, spec.student_steps, spec.student_anneal_steps, 1, STUDENT_SCRIPTS),
    )
    for role, shape, steps, anneal_steps, seed_offset, scripts in roles:
        fingerprint = spec.role_fingerprint(role)
        if earlier is not None and earlier[1].role_fingerprint(role) == fingerprint:
            shutil.copytree(Path(reuse) / role, work / role)
            report[role] = {**earlier[0].get(role, {}), "fingerprint": fingerprint, "reused_from": earlier[0]["fingerprint"]}
            log.info("search world %s: inputs unchanged, copied from %s", role, reuse)
            continue
        init = init_model(work / f"{role}-init", shape, tokenizer, spec, spec.seed + seed_offset)
        summary = train(sft_config(work, init, work / f"{role}-sft", steps, spec, progress, scripts))
        seconds, final = summary["wall_seconds"], work / f"{role}-sft" / "final"
        if anneal_steps:  # a second stage at a lower learning rate, from the first stage's weights
            anneal = replace(spec, lr=spec.anneal_lr, warmup_steps=0)
            summary = train(sft_config(work, final, work / f"{role}-anneal", anneal_steps, anneal, progress, scripts))
            seconds, final = seconds + summary["wall_seconds"], work / f"{role}-anneal" / "final"
        final.rename(work / role)
        shutil.rmtree(init)
        report[role] = {
            "exact_match": summary["student_accuracy_after"], "f1": summary["eval_after"].get("f1"),
            "tool_calls": summary["eval_after"].get("episode_tool_calls"), "sft_steps": steps + anneal_steps,
            "sft_seconds": round(seconds, 2), "parameters": parameter_count(work / role), "machine": machine(), "fingerprint": fingerprint,
        }
        log.info("search world %s: %.1f%% held-out exact match after %d SFT steps", role, 100 * summary["student_accuracy_after"], steps)
    (work / STUDENT_SCRIPTS).unlink()  # derived from train.jsonl and the spec; not shipped
    (work / "world.json").write_text(json.dumps(report, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    work.rename(directory)
    return directory


def _earlier_search_world(directory: Path) -> tuple[dict, SearchWorldSpec]:
    """An earlier search world's report and the spec it was built from."""
    # worlds built before these fields taught the student the teacher's scripts, in one stage
    return earlier_build(directory, SearchWorldSpec, {"student_second_search": 1.0, "student_anneal_steps": 0})


def verify_search_world(reference: Path, spec: SearchWorldSpec = DEFAULT_SEARCH_SPEC, progress: bool = True) -> list[str]:
    """Rebuild the search world in a temporary directory; return the files that differ from ``reference``."""
    with tempfile.TemporaryDirectory() as tmp:
        return differing_files(build_search_world(Path(tmp) / "search_world", spec, progress), reference, SEARCH_WORLD_FILES)
