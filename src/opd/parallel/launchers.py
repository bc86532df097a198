"""The launchers that start several copies of opd, and what each tells a copy about its place in the job.

A launcher is read from the environment it gives each process. Every entry of ``LAUNCHERS`` answers
three questions about that environment:

- ``placement``: this process's ``(rank, world_size, local_rank)`` when the launcher started it, else None;
- ``refusal``: what it was asked to do that opd does not do (one line), else None;
- ``ignored``: the settings it carries that opd leaves to its own config (said once, as warnings).

``torchrun`` and ``accelerate launch`` both set ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` (accelerate runs
torchrun underneath), so ``Torchrun`` places the processes of both; ``Accelerate`` only reads accelerate's own
variables (its DeepSpeed and FSDP plugins, its mixed precision). A new launcher is one more class here with
these three methods, listed in ``LAUNCHERS`` (docs/architecture.md, "Extending opd"). This module imports
nothing of opd.
"""

from __future__ import annotations

import os
from typing import Mapping, Protocol

Placement = tuple[int, int, int]  # (rank, world_size, local_rank)
SINGLE_PROCESS: Placement = (0, 1, 0)


class Launcher(Protocol):
    name: str

    def placement(self, env: Mapping[str, str]) -> Placement | None:
        """This process's place in the job when this launcher started it, else None."""

    def refusal(self, env: Mapping[str, str], sharding: str) -> str | None:
        """What the launcher was configured to do that opd does not, in words; None when nothing."""

    def ignored(self, env: Mapping[str, str]) -> list[str]:
        """The launcher's settings that opd leaves to its own config."""


class Torchrun:
    """``torchrun`` (and anything that sets its variables: ``accelerate launch``, ``python -m torch.distributed.run``)."""

    name = "torchrun"

    def placement(self, env: Mapping[str, str]) -> Placement | None:
        if "WORLD_SIZE" not in env and "RANK" not in env:
            return None
        world = int(env.get("WORLD_SIZE", "1") or 1)
        rank = int(env.get("RANK", "0") or 0)
        local = int(env.get("LOCAL_RANK", str(rank)) or 0)
        return rank, world, local

    def refusal(self, env: Mapping[str, str], sharding: str) -> str | None:
        return None

    def ignored(self, env: Mapping[str, str]) -> list[str]:
        return []


class Accelerate:
    """``accelerate launch``: its plugins and precision, read from the ``ACCELERATE_*`` variables it sets."""

    name = "accelerate"

    def placement(self, env: Mapping[str, str]) -> Placement | None:
        return None  # accelerate launch starts torchrun, whose variables place the processes

    def refusal(self, env: Mapping[str, str], sharding: str) -> str | None:
        """accelerate's DeepSpeed plugin, or its FSDP plugin unless the config shards the student itself
        (``train.sharding=fsdp``)."""
        if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            return (
                "accelerate launch was configured for DeepSpeed, which opd does not support; launch without the plugin "
                "(accelerate launch --multi_gpu, or torchrun), with train.sharding=fsdp to shard the student"
            )
        if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and sharding != "fsdp":
            return (
                "accelerate launch was configured for FSDP but train.sharding is 'none' (every rank would hold the whole "
                "student); set train.sharding=fsdp (opd applies FSDP2 itself) or launch without the plugin"
            )
        return None

    def ignored(self, env: Mapping[str, str]) -> list[str]:
        ignored = []
        precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        if precision not in ("", "no"):
            ignored.append(f"accelerate's --mixed_precision {precision} (opd's precision is train.precision: auto, fp32 or bf16)")
        plugin = sorted(k for k in env if k.startswith("FSDP_")) if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" else []
        if plugin:
            ignored.append(
                f"accelerate's FSDP plugin settings ({', '.join(plugin)}; train.sharding=fsdp applies FSDP2 to every decoder layer)"
            )
        return ignored


LAUNCHERS: tuple[Launcher, ...] = (Torchrun(), Accelerate())


def launched_world(env: Mapping[str, str] | None = None) -> Placement:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) when opd was not launched by one."""
    env = os.environ if env is None else env
    for launcher in LAUNCHERS:
        if (placement := launcher.placement(env)) is not None:
            return placement
    return SINGLE_PROCESS


def unsupported_launch(sharding: str = "none", env: Mapping[str, str] | None = None) -> str | None:
    """What a launcher asked for that opd does not do, in words (None when nothing)."""
    env = os.environ if env is None else env
    return next((r for launcher in LAUNCHERS if (r := launcher.refusal(env, sharding)) is not None), None)


def ignored_launch_settings(env: Mapping[str, str] | None = None) -> list[str]:
    """Launcher settings opd leaves to its own config (said once, as a warning)."""
    env = os.environ if env is None else env
    return [setting for launcher in LAUNCHERS for setting in launcher.ignored(env)]
