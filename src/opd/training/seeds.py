"""Where a step's randomness comes from: functions of the run's seed, the step and the micro-batch only, so a resumed
run draws what an uninterrupted one would, and 2 ranks x 1 micro-batch draw what 1 process x 2 does."""

from __future__ import annotations

import hashlib
import random

import torch


def step_generators(seed: int, step: int, device: torch.device, micro: int = 0) -> tuple[random.Random, torch.Generator]:
    """The data RNG and sampling generator of micro-batch ``micro`` of ``step``: a function of (seed, step, micro)
    only. Micro-batch 0's RNG also draws the step's prompts (the same on every rank)."""
    if micro == 0:
        return random.Random(f"opd-data-{seed}-{step}"), torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % (2**63))
    digest = hashlib.sha256(f"opd-micro-{seed}-{step}-{micro}".encode()).digest()
    return random.Random(digest), torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") % (2**63))


def micro_seed(seed: int, step: int, micro: int) -> int:
    """Micro-batch ``micro`` of ``step``'s own seed for its forward passes (dropout; ``Batch.rng``)."""
    return int.from_bytes(hashlib.sha256(f"opd-forward-{seed}-{step}-{micro}".encode()).digest()[:8], "little") % (2**63)
