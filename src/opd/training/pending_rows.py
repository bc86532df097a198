"""Rows generated for steps not trained yet, written into a checkpoint without pickle (``sampling.max_staleness``).

With a lag L, the rows of steps k … k+L−1 exist before step k trains (``training.rollout_pipeline``); they came from
weights the checkpoint of step k no longer holds, so a resumed run must get them from the checkpoint to train what
an uninterrupted run trains. A batch becomes its tensors (safetensors) and everything else as JSON; a value of
another kind is refused, naming it, rather than saved in a form that could not be read back exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..methods.batch import Batch
from ..models.rollouts import Rollouts
from ..tasks.base import Example

BATCH_FIELDS = ("on_policy", "rewards", "baseline_rewards", "info", "advantages_B", "train_mask_BC", "row_notes", "seed")


@dataclasses.dataclass
class StepRows:
    """One step's sampled micro-batches (this rank's), and the weights that made them: the student after
    ``version`` steps."""

    batches: list[Batch]
    version: int


class RowsNotSaved(TypeError):
    """A value in a step's rows that a checkpoint cannot hold exactly."""


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON can hold it (non-finite floats as strings), or ``RowsNotSaved`` naming ``where``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _plain(v, f"{where}.{k}") for k, v in value.items()}}
    raise RowsNotSaved(f"{where} is a {type(value).__name__}, which a checkpoint cannot hold")


def _unplain(value: Any) -> Any:
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    if isinstance(value, dict):
        if "float" in value:
            return float(value["float"])
        return {k: _unplain(v) for k, v in value["dict"].items()}
    return value


def encode_step(rows: StepRows, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    """``rows`` as JSON, its tensors put into ``tensors`` under names starting with ``prefix``."""
    batches = []
    for b, batch in enumerate(rows.batches):
        name = f"{prefix}.{b}"
        fields: dict[str, Any] = {}
        for key in BATCH_FIELDS:
            value = getattr(batch, key)
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
                fields[key] = {"tensor": f"{name}.{key}"}
            else:
                fields[key] = _plain(value, f"batch.{key}")
        rollout = {}
        for key, value in vars(batch.rollouts).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.rollouts.{key}"] = value.detach().cpu().contiguous()
                rollout[key] = {"tensor": f"{name}.rollouts.{key}"}
            else:
                rollout[key] = _plain(value, f"rollouts.{key}")
        examples = [
            {f.name: _plain(getattr(e, f.name), f"example.{f.name}") for f in dataclasses.fields(Example)} for e in batch.examples
        ]
        batches.append({"fields": fields, "rollouts": rollout, "examples": examples})
    return {"version": rows.version, "batches": batches}


def decode_step(data: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> StepRows:
    def value(v):
        return tensors[v["tensor"]].to(device) if isinstance(v, dict) and "tensor" in v else _unplain(v)

    batches = []
    for item in data["batches"]:
        rollout_values = {k: value(v) for k, v in item["rollouts"].items()}
        known = {f.name for f in dataclasses.fields(Rollouts)}
        rollouts = Rollouts(**{k: v for k, v in rollout_values.items() if k in known})
        for k, v in rollout_values.items():
            if k not in known:
                setattr(rollouts, k, v)
        examples = []
        for e in item["examples"]:
            fields = {k: _unplain(v) for k, v in e.items()}
            if fields.get("messages") is not None:
                fields["messages"] = tuple(fields["messages"])
            examples.append(Example(**fields))
        batch = Batch(rollouts, examples, on_policy=bool(item["fields"]["on_policy"]))
        for key in BATCH_FIELDS:
            setattr(batch, key, value(item["fields"][key]))
        batches.append(batch)
    return StepRows(batches, int(data["version"]))


def save_pending(directory: Path, per_rank: list[dict[int, StepRows]]) -> None:
    """Every rank's rows of the steps ahead into ``directory`` (``rows.safetensors`` + ``rows.json``)."""
    tensors: dict[str, torch.Tensor] = {}
    plan = []
    for rank, ahead in enumerate(per_rank):
        plan.append({str(step): encode_step(rows, f"r{rank}.s{step}", tensors) for step, rows in sorted(ahead.items())})
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "rows.safetensors"))
    (directory / "rows.json").write_text(json.dumps({"ranks": plan}))


def load_pending(directory: Path, rank: int, world_size: int, device: torch.device) -> dict[int, StepRows] | None:
    """This rank's rows of the steps ahead from a checkpoint's ``directory``; None where it has none, or where they
    were sampled by another number of ranks (each rank's rows are its own share of a step)."""
    if not (directory / "rows.json").is_file():
        return None
    plan = json.loads((directory / "rows.json").read_text())["ranks"]
    if len(plan) != world_size:
        return None
    tensors = load_file(str(directory / "rows.safetensors"))
    return {int(step): decode_step(data, tensors, device) for step, data in plan[rank].items()}
