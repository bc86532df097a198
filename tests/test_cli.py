import json
import subprocess
import sys

from opd.cli import main


def test_cli_reports_config_errors_without_traceback(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("student:\n  path: x\nmethod:\n  name: sft\n")
    assert main(["train", str(cfg), "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "opd: error: unknown config key 'train.lrr' (did you mean 'train.lr'?)"


def test_cli_reports_missing_model(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"student:\n  path: {tmp_path}/missing\nmethod:\n  name: sft\nrun:\n  output_dir: {tmp_path}/run\n")
    assert main(["train", str(cfg)]) == 2
    assert f"opd: error: student.path: no model at '{tmp_path}/missing'" in capsys.readouterr().err


def test_cli_eval_prints_json(capsys, tiny_models):
    assert main(["eval", str(tiny_models[0]), "--task", "arithmetic", "eval.num_prompts=4", "sampling.max_new_tokens=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"] == 4 and 0 <= out["accuracy"] <= 1


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "opd", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in result.stdout and "train" in result.stdout


def test_opd_train_ends_with_the_demos_table_not_json(capsys, tmp_path, tiny_models):
    teacher, student = tiny_models
    args = [f"student.path={student}", f"teacher.path={teacher}", f"run.output_dir={tmp_path / 'run'}", "train.steps=1",
            "train.prompts_per_step=4", "sampling.max_new_tokens=4", "eval.num_prompts=4", "eval.every=0", "eval.teacher=false",
            "checkpoint.every=0", "log.progress_bar=false", "log.plot=false", "log.tensorboard=false"]
    assert main(["train", "configs/demo.yaml", *args]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    lines = out.strip().splitlines()
    assert lines[0].split() == ["model", "accuracy"] and lines[2].startswith("teacher") and "n/a" in lines[2]  # no teacher eval
    assert lines[4].startswith("student after 1 OPD steps") and f"{100 * summary['student_accuracy_after']:.1f}%" in lines[4]
    assert lines[-1].endswith(f"summary.json, metrics and curves in {tmp_path / 'run'}/") and "{" not in out


def test_progress_outside_a_terminal_is_a_line_every_interval_and_at_the_end():
    import io

    from opd.training.progress import ProgressLines

    stream = io.StringIO()
    bar = ProgressLines(range(3, 10), 3, 10, "demo", every_s=3600, stream=stream)
    for step in bar:
        bar.set_postfix({"loss": f"{step:.1f}"})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("demo: step 10/10 (100%), ") and lines[0].endswith("s/step, loss=9.0")
    every = io.StringIO()
    for _ in ProgressLines(range(4), 0, 4, "run", every_s=0.0, stream=every):
        pass
    assert [line.split(",")[0] for line in every.getvalue().splitlines()] == [f"run: step {i}/4 ({25 * i}%)" for i in range(1, 5)]
    assert "\r" not in stream.getvalue() + every.getvalue()
