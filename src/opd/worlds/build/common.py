"""What the embedded worlds' builds share: fresh Llama checkpoints, an earlier build's report, the machine a role was
trained on, and the comparison of a rebuild with a world on disk."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..arithmetic import ModelShape


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


def work_directory(directory: Path) -> Path:
    """A fresh directory beside ``directory`` for one build (this process's), renamed into place when it ends: an
    interrupted build never leaves a half-written world where opd looks for one."""
    work = directory.with_name(directory.name + f".building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def init_model(directory: Path, shape: ModelShape, tokenizer, spec, seed: int) -> Path:
    """Save a freshly initialised model (and the tokenizer) as a HF checkpoint; ``spec``: the world's (its
    ``max_positions``)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(shape, tokenizer, spec.max_positions))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


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


def machine() -> str:
    """The CPU a role was trained on: byte-for-byte reproduction holds on the same CPU (and torch version)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parameter_count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        return sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())


def differing_files(fresh: Path, reference: Path, parts: tuple[str, ...]) -> list[str]:
    """The files of ``parts`` (directories or single files) in a freshly built world that are missing from
    ``reference`` or differ from it there, byte for byte (checkpoint manifests aside: they list the sizes compared)."""
    differing = []
    for name in parts:
        paths = [fresh / name] if (fresh / name).is_file() else sorted((fresh / name).rglob("*"))
        for path in paths:
            if path.is_file() and path.name != "manifest.json":
                other = reference / path.relative_to(fresh)
                if not other.is_file() or other.read_bytes() != path.read_bytes():
                    differing.append(str(path.relative_to(fresh)))
    return differing


def built_elsewhere(reference: Path, differing: list[str]) -> str:
    """Which differing roles (the trained models the world's report lists) were trained on another CPU, where bytes are
    not expected to match; data files and the tokenizer are written from the spec alone."""
    report = json.loads((Path(reference) / "world.json").read_text())
    here = machine()
    roles = sorted({name.split("/", 1)[0] for name in differing if isinstance(report.get(name.split("/", 1)[0]), dict)})
    notes = [f"{r} was built on {report.get(r, {}).get('machine', 'an unrecorded CPU')}" for r in roles if report.get(r, {}).get("machine") != here]
    return f"this machine: {here}; " + ("; ".join(notes) if notes else "every differing role was built on this CPU")
