"""The demo's claim, end to end on the embedded world (builds it once if missing: minutes). Run with -m slow."""

import json

import pytest

from opd.cli import main


@pytest.mark.slow
def test_demo_lifts_the_student(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_accuracy"] >= 0.95
    assert summary["student_accuracy_after"] >= 0.90
    assert summary["student_accuracy_after"] - summary["student_accuracy_before"] >= 0.25
    assert (out / "curves.png").stat().st_size > 10_000
    assert summary["wall_seconds"] < 600
