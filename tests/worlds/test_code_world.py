"""The embedded code world: its rows are the same on every build, held-out rows are combinations no training row has,
every reference program passes its own tests in the real sandbox, and a (tiny) build is deterministic, loadable and
reuses the roles whose inputs did not change."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from opd.sandbox.checks import RowTests, check_all
from opd.sandbox.run import Sandbox
from opd.worlds.arithmetic import ModelShape
from opd.worlds.code import DEFAULT_CODE_SPEC, FAMILIES, TEMPLATES, code_rows

SMALL = replace(DEFAULT_CODE_SPEC, train_rows=300, eval_rows=32)


def test_the_rows_are_the_same_on_every_build_and_each_family_is_half_the_evaluation():
    assert code_rows(SMALL) == code_rows(SMALL)
    _, eval_rows = code_rows(SMALL)
    assert [sum(r["family"] == f for r in eval_rows) for f in FAMILIES] == [16, 16]


def test_held_out_rows_are_combinations_no_training_row_has():
    train, held_out = code_rows(SMALL)
    signature = lambda r: (r["prompt"].splitlines()[0], r["prompt"].splitlines()[1])  # noqa: E731 - the def line and the doc
    assert not {signature(r) for r in held_out} & {signature(r) for r in train}
    docs = {r["prompt"].splitlines()[1].strip().removeprefix('"""') for r in code_rows()[0]}  # the default world's
    assert all(any(d.startswith(t.doc.split("{")[0]) for d in docs) for t in TEMPLATES)  # every template is trained on


def test_every_reference_program_passes_its_own_tests_in_the_sandbox():
    train, held_out = code_rows(SMALL)
    rows = held_out + train[:64]
    sandbox = Sandbox(workers=4)
    verdicts = check_all(sandbox, [r["completion"].removeprefix("```python\n").removesuffix("```") for r in rows],
                         [RowTests(statements=tuple(r["test"])) for r in rows])
    sandbox.close()
    assert all(v.all_passed and v.total == SMALL.tests for v in verdicts), [v for v in verdicts if not v.all_passed][:3]


def test_the_examples_shown_are_the_reference_functions_values():
    row = code_rows(SMALL)[1][0]
    scope: dict = {}
    exec(row["completion"].removeprefix("```python\n").removesuffix("```"), scope)
    shown = [line.strip() for line in row["prompt"].splitlines()[2:-1]]
    assert len(shown) == SMALL.examples
    for line in shown:
        call, expected = line.split(" == ")
        assert repr(eval(call, scope)) == expected  # noqa: S307 - the world's own reference program


TINY = replace(
    SMALL, train_rows=40, eval_rows=8, teacher_shape=ModelShape(16, 1, 32, 2), student_shape=ModelShape(16, 1, 32, 2),
    teacher_steps=2, student_steps=1, expert_steps=1, batch_size=4, warmup_steps=0,
)


@pytest.mark.slow
def test_a_build_is_deterministic_loadable_and_reuses_unchanged_roles(tmp_path):
    from transformers import AutoModelForCausalLM

    from opd.worlds.build.code import build_code_world

    first = build_code_world(tmp_path / "a", TINY, progress=False)
    second = build_code_world(tmp_path / "b", TINY, progress=False)
    for role in ("teacher", "student", "expert_numbers", "expert_text"):
        assert (first / role / "model.safetensors").read_bytes() == (second / role / "model.safetensors").read_bytes()
        AutoModelForCausalLM.from_pretrained(first / role)
    report = json.loads((first / "world.json").read_text())
    assert set(report["expert_numbers"]) >= {"pass@1", "pass@1_numbers", "pass@1_text"}
    assert (first / "expert_text" / "model.safetensors").read_bytes() != (first / "student" / "model.safetensors").read_bytes()
    assert sorted(p.name for p in first.iterdir()) == sorted(["tokenizer", "teacher", "student", "expert_numbers", "expert_text",
                                                              "train.jsonl", "eval.jsonl", "world.json", "teacher-sft", "student-sft",
                                                              "expert_numbers-sft", "expert_text-sft"])
    changed = replace(TINY, expert_steps=2)
    assert changed.role_fingerprint("student") == TINY.role_fingerprint("student")
    assert changed.role_fingerprint("expert_text") != TINY.role_fingerprint("expert_text")
    third = build_code_world(tmp_path / "c", changed, progress=False, reuse=first)
    again = json.loads((third / "world.json").read_text())
    assert again["teacher"]["reused_from"] == TINY.fingerprint() and again["student"]["reused_from"] == TINY.fingerprint()
    assert "reused_from" not in again["expert_text"]


def test_the_shipped_code_world_matches_the_default_spec():
    """The shipped world's report is for the default spec (so world:code/... finds it): a teacher that writes most
    held-out functions, a weaker student, and each expert ahead of the student on its own family."""
    from opd.worlds.locate import WORLDS, world_dir

    shipped = WORLDS["code"].shipped
    report = json.loads((shipped / "world.json").read_text())
    assert report["fingerprint"] == DEFAULT_CODE_SPEC.fingerprint() and world_dir("code") == shipped
    for role in ("teacher", "student", "expert_numbers", "expert_text"):
        assert report[role]["fingerprint"] == DEFAULT_CODE_SPEC.role_fingerprint(role)
    assert report["teacher"]["pass@1"] >= report["student"]["pass@1"] + 0.3
    for family in FAMILIES:
        assert report[f"expert_{family}"][f"pass@1_{family}"] > report["student"][f"pass@1_{family}"]
    assert sorted(json.loads(line)["family"] for line in (shipped / "eval.jsonl").read_text().splitlines()) == ["numbers"] * 128 + ["text"] * 128


def test_the_demo_and_merge_configs_name_the_shipped_world(tmp_path):
    """Every config under configs/code/ loads, and its world:code/ parts are the shipped files (as opd demo and the
    merge claim sets run them); the merge routes each family to its own expert."""
    from opd.cli import CONFIG_DIR
    from opd.config.loading import load_config
    from opd.models.loading import resolve_path
    from opd.tasks.rows import world_file
    from opd.worlds.locate import WORLDS

    shipped = WORLDS["code"].shipped
    for name in ("demo", "merge_opd", "merge_exopd", "expert_numbers", "expert_text"):
        cfg = load_config(CONFIG_DIR / "code" / f"{name}.yaml", [f"run.output_dir={tmp_path / name}"])
        assert world_file(cfg.task.path) == str(shipped / "train.jsonl") and world_file(cfg.task.eval_path) == str(shipped / "eval.jsonl")
        assert str(resolve_path(cfg.student.path, "student.path")).startswith(str(shipped))
    merge = load_config(CONFIG_DIR / "code" / "merge_exopd.yaml", [f"run.output_dir={tmp_path / 'm'}"])
    assert merge.teacher.routes == {"numbers": "world:code/expert_numbers", "text": "world:code/expert_text"}
    assert merge.task.teacher_field == "family" and merge.method.gopd.reward_scale == 1.25
