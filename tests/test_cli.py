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
