"""The model a run leaves in ``<run>/final/``: one that ``AutoModelForCausalLM.from_pretrained`` loads (LoRA merged, the
adapter beside it), swapped in atomically so that a run killed at any moment leaves a complete one."""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

import torch

from .checkpoints import MANIFEST, CheckpointError, fsync_dir, fsync_tree, write_errors, write_failure, write_manifest


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def save_final_model(student: torch.nn.Module, tokenizer, path: Path, whole: dict | None = None) -> None:
    """A checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads: LoRA adapters merged into the weights; the
    weights of a sharded student from ``whole`` (``parallel.sharding.whole_state_dict``).

    Written beside ``path``, fsynced with a manifest, then swapped in atomically (``renameat2`` exchange on Linux;
    elsewhere two renames, after which a complete one is always ready for ``recover_final_model`` to put back)."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model = student
    try:
        if hasattr(model, "merge_and_unload"):  # a peft (LoRA) model
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": whole} if whole is not None else {}))
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp)
        fsync_tree(tmp)
    except write_errors() as err:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "the earlier final model is intact; " if path.exists() else ""
        raise CheckpointError(
            f"cannot write the final model to {path}: {write_failure(err)}; {kept}free space, then --resume writes it again "
            "from the last checkpoint (checkpoint.at_end keeps one of the last step)"
        ) from None
    shutil.rmtree(old, ignore_errors=True)
    if path.exists() and exchange(tmp, path):  # atomic: final/ is the old model, then the new one, never absent
        os.replace(tmp, old)
    else:
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_final_model(path: Path) -> None:
    """After a run killed while swapping in ``final/``: put the complete new (or else the old) one back."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if not path.exists():
        if (tmp / MANIFEST).is_file():
            os.replace(tmp, path)
        elif old.exists():
            os.replace(old, path)
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
