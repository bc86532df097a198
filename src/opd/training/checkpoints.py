"""Checkpoints: HF weights + optimizer / scheduler / RNG state, written atomically, no pickle.

Layout of ``<run>/checkpoints/step-000040/``:

    model/                 save_pretrained output (full model, or the LoRA adapter) + tokenizer
    trainable.safetensors  the trainable parameters, by name (what resume loads)
    optimizer.safetensors  optimizer tensors;  optimizer.json  the rest of its state
    rng.safetensors        torch RNG states;   state.json  step, counters, scheduler, python RNG
    extra.safetensors      state of stateful teachers (an EMA teacher's weights), when there is any

Everything is written into a temporary sibling directory, fsynced, and renamed into place
(the parent directory fsynced too), with ``manifest.json`` — every file's size — written
last, so a run killed mid-write leaves the previous checkpoint intact. On resume the newest
checkpoint is verified (manifest, sizes, safetensors headers, JSON state) and, if damaged,
the newest intact one is used instead, with a message; leftovers of interrupted writes and
deletions are cleaned away.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..parallel.sharding import is_sharded, like_param, load_into, whole_state_dict

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
MANIFEST = "manifest.json"


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory, ``root`` included (data and names on disk)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> None:
    """Record every file's size; written last, so its presence means the rest was complete."""
    sizes = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / MANIFEST).write_text(json.dumps(sizes))


def checkpoint_problem(path: Path) -> str | None:
    """None when the checkpoint at ``path`` is complete and readable, else what is wrong with it."""
    manifest = path / MANIFEST
    try:
        sizes = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return "no readable manifest (the write did not finish)"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return f"{name} is missing or truncated"
    try:
        for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):
            with safe_open(str(path / name), "pt"):
                pass
        json.loads((path / "state.json").read_text())
        json.loads((path / "optimizer.json").read_text())
    except Exception as err:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
        return f"unreadable ({err})"
    return None


class CheckpointError(RuntimeError):
    """A checkpoint (or the final model, or the run's metrics) could not be written — e.g. the disk is full; what was
    written before is intact."""


def write_failure(err: Exception) -> str:
    """What went wrong writing a file, in words: an ``OSError`` or safetensors' own error (which wraps the OS's)."""
    import errno

    code = getattr(err, "errno", None)
    text = str(err)
    if code in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in text or "os error 122" in text:
        return "no space left on the device (or the disk quota is used up)"
    if code == errno.EFBIG or "os error 27" in text:
        return "a file grew past the size this process may write (RLIMIT_FSIZE / ulimit -f)"
    return getattr(err, "strerror", None) or " ".join(text.split())[:200]


def write_errors() -> tuple[type[Exception], ...]:
    """The errors a full disk or a write limit raises while a checkpoint or model is written."""
    from safetensors import SafetensorError

    return (OSError, SafetensorError)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


@dataclass
class FullState:
    """What a checkpoint writes, as whole tensors on rank 0 (``full_state``): the same files whether the run is
    sharded or not, so either kind resumes the other."""

    trainable: dict[str, torch.Tensor]  # trainable parameters by name
    optimizer: dict  # ``optimizer.state_dict()`` layout: state by parameter index, param_groups
    model: dict[str, torch.Tensor] | None = None  # the model's whole state dict when it is sharded (None: read the model)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> FullState:
    """The model's and optimizer's state as whole tensors. For a sharded model this is a collective (every rank calls
    it; rank 0 receives the tensors, in CPU memory, the others empty dicts)."""
    if not is_sharded(model) or not optimizer.state:  # no state yet (no update applied): nothing sharded to gather,
        # and torch's get_optimizer_state_dict would create it by stepping the optimizer at lr 0 (its step count with it)
        whole = whole_state_dict(model)
        trainable = trainable_state(model) if whole is None else {n: whole[n].contiguous() for n, p in model.named_parameters() if p.requires_grad and n in whole}
        return FullState(trainable, optimizer.state_dict(), whole)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    whole = whole_state_dict(model)
    by_name = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    trainable = {name: whole[name].contiguous() for name in names if name in whole}
    return FullState(trainable, _by_index(by_name, names) if whole else {}, whole)


def _by_index(state_dict: dict, names: list[str]) -> dict:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint's) in ``optimizer.state_dict()``'s layout,
    parameter ``i`` being the ``i``-th trainable parameter (the order ``build_optimizer`` gives them)."""
    index = {name: i for i, name in enumerate(names)}
    groups = [dict(group, params=[index[name] for name in group["params"]]) for group in state_dict["param_groups"]]
    return {"state": {index[name]: value for name, value in state_dict["state"].items()}, "param_groups": groups}


def _optimizer_to_files(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    keep_last: int,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    whole: FullState | None = None,
    write_more: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``<run>/checkpoints/step-NNNNNN``; ``whole`` is ``full_state(model, optimizer)`` (taken here when not
    given; a sharded model's must be taken on every rank first); ``write_more(directory)`` adds files of its own
    (the rows of the steps ahead, ``training.pending_rows``) before the manifest."""
    whole = whole if whole is not None else full_state(model, optimizer)
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp / "model", safe_serialization=True, **({"state_dict": whole.model} if whole.model is not None else {}))
        tokenizer.save_pretrained(tmp / "model")
        save_file(whole.trainable, tmp / "trainable.safetensors")
        opt_tensors, opt_meta = _optimizer_to_files(whole.optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        if extra_tensors:
            save_file(extra_tensors, tmp / "extra.safetensors")
        version, internal, gauss = random.getstate()
        saved_state = dict(state, step=step, scheduler=scheduler.state_dict(), python_rng=[version, list(internal), gauss])
        (tmp / "state.json").write_text(json.dumps(saved_state))
        if write_more is not None:
            write_more(tmp)
        write_manifest(tmp)
        fsync_tree(tmp)
    except write_errors() as err:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(run_dir)[-1:]
        kept = f"the previous checkpoint, {previous[0].name}, is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"cannot write checkpoint {final}: {write_failure(err)}; {kept} (free space, then --resume)") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        remove_checkpoint(old)
    return final


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that an interruption leaves no directory that looks like one: rename, then delete."""
    doomed = path.with_name(f".deleting-{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint; newer damaged ones are reported and skipped. Also removes leftovers of
    interrupted writes (``.tmp-*``) and deletions (``.deleting-*``)."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for leftover in root.iterdir():
            if leftover.is_dir() and leftover.name.startswith((".tmp-", ".deleting-")):
                shutil.rmtree(leftover, ignore_errors=True)
    for path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is damaged (%s); trying the one before it", path, problem)
    return None


def load_extra_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors saved beside the model (e.g. an EMA teacher); empty when there are none."""
    extra = Path(path) / "extra.safetensors"
    return load_file(extra) if extra.is_file() else {}


def load_trainable(path: Path, model: torch.nn.Module) -> None:
    """Copy the checkpoint's trainable tensors (the whole student, or its LoRA adapters) into ``model``."""
    weights = load_file(Path(path) / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable parameters {missing[:3]} (different model or LoRA setting?)")
    for name, tensor in weights.items():
        load_into(params[name], tensor)  # a sharded parameter takes its own share


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``path``; return its state dict."""
    path = Path(path)
    load_trainable(path, model)
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_from_files(load_file(path / "optimizer.safetensors"), meta))
    for group in optimizer.param_groups:  # the saved state is whole; a sharded parameter's state is its share
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    optimizer.state[p][key] = like_param(p, value)
    state = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(state.pop("scheduler"))
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count())])
    return state
