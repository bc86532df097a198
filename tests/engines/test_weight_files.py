"""The file transport of ``sampling.engine=vllm_server`` without a server: weights written as safetensors parts in the
engine's dtype and read back in order, and the directories a killed trainer left behind removed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from opd.engines.vllm_server import remove_orphaned_pushes
from opd.engines.weight_files import read_weight_files, write_weight_files


def test_weights_come_back_in_order_in_the_engines_dtype_and_parts_stay_under_the_chunk(tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = [("a", torch.randn(300, 300, generator=g)), ("b", torch.randn(10, generator=g)), ("c", torch.randn(600, 600, generator=g)),
               ("steps", torch.arange(5))]
    parts, written = write_weight_files(iter(weights), tmp_path, torch.bfloat16, chunk_mb=0.3)
    assert len(parts) == 3  # a + b, then c alone (larger than a part), then steps
    back = list(read_weight_files(tmp_path))
    assert [name for name, _ in back] == ["a", "b", "c", "steps"]
    for (_, original), (_, read) in zip(weights, back):
        assert torch.equal(read, original.to(torch.bfloat16) if original.is_floating_point() else original)
    assert written == sum(t.numel() * (2 if t.is_floating_point() else 8) for _, t in weights)


def test_a_write_that_fails_still_consumes_every_weight(tmp_path):
    seen = []

    def weights():
        for i in range(4):
            seen.append(i)  # (a sharded model's gather: every rank must reach each one)
            yield f"w{i}", torch.zeros(2)

    with pytest.raises(Exception, match="No such file"):  # (safetensors raises its own error for an OSError)
        write_weight_files(weights(), tmp_path / "missing", None, 1e-6)  # the first part's file cannot be written
    assert seen == [0, 1, 2, 3] and not list(tmp_path.iterdir())


def test_pushes_of_a_trainer_that_is_gone_are_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    for name in (f"opd-weights-{dead}-x1", f"opd-adapter-{dead}-x2", f"opd-weights-{os.getpid()}-x3", "opd-weights-other", "unrelated"):
        (tmp_path / name).mkdir()
    remove_orphaned_pushes(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"opd-weights-{os.getpid()}-x3", "opd-weights-other", "unrelated"])
