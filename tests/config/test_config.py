import re
import pytest

from opd.config.loading import load_config
from opd.config.saving import save_config
from opd.config.sections import ConfigError


def test_defaults_need_a_student():
    with pytest.raises(ConfigError, match="config key 'student.path' is required"):
        load_config(None, [])


def test_override_types_are_parsed():
    cfg = load_config(None, ["student.path=x", "method.name=sft", "train.lr=3e-4", "train.steps=7", "student.lora.enabled=true", "train.grad_clip=null"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 7
    assert cfg.student.lora.enabled is True
    assert cfg.train.grad_clip is None


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["student.path=x", "method.name=sft", "train.lrr=1e-4"])
    assert str(err.value) == "unknown config key 'train.lrr' (did you mean 'train.lr'?)"


def test_unknown_section_suggests_closest():
    with pytest.raises(ConfigError, match=r"^unknown config key 'sampeling' \(did you mean 'sampling'\?\)$"):
        load_config(None, ["student.path=x", "sampeling.temperature=1.0"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["student.path=x", "method.name=sft", "train.steps=ten"])
    assert str(err.value) == "config key 'train.steps' must be an integer, got 'ten'"


def test_impossible_value_names_key():
    with pytest.raises(ConfigError, match=r"config key 'sampling.top_p' must be in \(0, 1\], got 1.5"):
        load_config(None, ["student.path=x", "method.name=sft", "sampling.top_p=1.5"])
    with pytest.raises(ConfigError, match="config key 'train.lr' must be a finite number > 0"):
        load_config(None, ["student.path=x", "method.name=sft", "train.lr=0"])


def test_literal_choices_listed():
    with pytest.raises(ConfigError, match="config key 'method.name' must be one of 'gkd', .*'opd', .*'sft', got 'dpo'"):
        load_config(None, ["student.path=x", "method.name=dpo"])


def test_method_needing_teacher_refused_without_one():
    with pytest.raises(ConfigError, match="config key 'teacher.path' is required by method 'opd'"):
        load_config(None, ["student.path=x", "method.name=opd"])


def test_grad_accum_must_divide_batch():
    with pytest.raises(ConfigError, match="'train.grad_accum' must divide train.prompts_per_step"):
        load_config(None, ["student.path=x", "method.name=sft", "train.prompts_per_step=6", "train.grad_accum=4"])


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student:\n  path: s\nmethod:\n  name: sft\ntrain:\n  steps: 3\n")
    cfg = load_config(path, ["train.steps=5"])
    assert cfg.train.steps == 5 and cfg.method.name == "sft"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips_and_redacts(tmp_path):
    cfg = load_config(None, ["student.path=s", "method.name=sft", "train.betas=[0.8,0.95]"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    from opd.config.saving import redact

    assert redact({"judge": {"api_key": "sk-123", "url": "u"}}) == {"judge": {"api_key": "<redacted>", "url": "u"}}


def test_base_config_is_overlaid(tmp_path):
    (tmp_path / "base.yaml").write_text("student:\n  path: s\nmethod:\n  name: sft\ntrain:\n  steps: 3\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.steps, cfg.train.lr, cfg.method.name) == (9, 0.5, "sft")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="'base' chain loops back"):
        load_config(tmp_path / "loop.yaml")


def test_every_shipped_config_validates():
    import importlib.util
    import sys
    from pathlib import Path

    import opd.cli

    files = sorted(Path(opd.cli.CONFIG_DIR).rglob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        if path.name == "claim.yaml":  # a claim set's test, not a run config (test_compare.py loads them)
            continue
        if path.stem == "gpu_node_vllm":  # a launch over 8 ranks with the vllm package: its own test below
            continue
        if path.parent.name == "own_models":  # the user gives the models and data
            cfg = load_config(path, ["student.path=/models/s", "teacher.path=/models/t", "task.path=train.jsonl"]
                              if path.stem not in ("opsd", "grpo") else ["student.path=/models/s", "task.path=train.jsonl"])
            assert cfg.task.name == "math" and cfg.method.name == (path.stem.removeprefix("gpu_") if path.stem != "base" else "opd")
        elif path.parent.name == "lag_costs_nothing":  # a vLLM server opd starts: its Python must have vllm
            with_vllm = [] if importlib.util.find_spec("vllm") else [f"sampling.vllm_server.python={sys.executable}"]
            assert load_config(path, with_vllm).sampling.engine == "vllm_server"
        elif path.parent.name == "search_qa":  # the user's questions and corpus
            teacher = [] if path.stem == "world_opsd" else ["teacher.path=/models/t"]  # OPSD's teacher is the student
            cfg = load_config(path, ["student.path=/models/s", *teacher, "task.questions=q.jsonl", "task.corpus=c.jsonl"])
            assert cfg.task.name == "search_qa"
        else:
            load_config(path)


def test_the_shipped_gpu_node_config_validates_for_eight_ranks(monkeypatch):
    """configs/own_models/gpu_node_vllm.yaml, as torchrun --nproc_per_node 8 on 8 GPUs would load it (vLLM engines, FSDP);
    where the vllm package is missing (the default environment) the one refusal is that."""
    import importlib.util

    from opd.cli import CONFIG_DIR
    from opd.config.sections import ConfigError

    import torch

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on the node: its checks read the GPUs' presence only
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    paths = ["student.path=/models/s", "teacher.path=/models/t", "task.path=train.jsonl"]
    path = f"{CONFIG_DIR}/own_models/gpu_node_vllm.yaml"
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match=r"'sampling\.engine' is 'vllm' but the vllm package is not installed"):
            load_config(path, paths)
        cfg = load_config(path, [*paths, "sampling.engine=hf"])  # everything else validates
    else:
        cfg = load_config(path, paths)
    assert (cfg.train.sharding, cfg.sampling.vllm.tensor_parallel_size, cfg.sampling.vllm.sleep) == ("fsdp", 1, True)
    with pytest.raises(ConfigError, match=r"tensor_parallel_size' is 3, which does not divide the launch's 8 ranks"):
        load_config(path, [*paths, "sampling.vllm.tensor_parallel_size=3"])


def test_credentials_inside_urls_are_redacted(tmp_path):
    from opd.config.saving import redact

    saved = redact({"http": {"url": "https://bob:hunter2@judge.example.com/v1?api_key=abc&model=m"}, "path": "world:student"})
    assert saved["http"]["url"] == "https://<redacted>@judge.example.com/v1?api_key=<redacted>&model=m"
    assert saved["path"] == "world:student"
    cfg = load_config(None, ["student.path=s", "teacher.path=t", "method.name=ovd", "method.ovd.judge=http",
                             "method.ovd.http.url=https://bob:hunter2@judge.example.com"])
    save_config(cfg, tmp_path / "c.yaml")
    assert "hunter2" not in (tmp_path / "c.yaml").read_text()


@pytest.mark.parametrize("key, suggested", [
    ("train.learning_rate", "train.lr"), ("train.bf16", "train.precision"), ("method.lmbda", "method.gkd.lambda_onpolicy"),
    ("train.save_steps", "checkpoint.every"), ("per_device_train_batch_size", "train.prompts_per_step"),
    ("sampling.max_completion_length", "sampling.max_new_tokens"), ("gradient_checkpointing", "train.gradient_checkpointing"),
])
def test_trl_argument_names_suggest_the_opd_key_that_does_their_work(key, suggested):
    with pytest.raises(ConfigError, match=rf"^unknown config key '{re.escape(key)}' \(did you mean '{re.escape(suggested)}' \(TRL's "):
        load_config(None, [f"{key}=1"])


def test_the_trl_table_names_real_keys_and_is_the_one_docs_print():
    from pathlib import Path

    from opd.config.loading import _all_keys
    from opd.config.schema import Config
    from opd.config.trl_names import TRL_NAMES

    keys = set(_all_keys(Config, ""))
    assert [name for name, (key, _) in TRL_NAMES.items() if key not in keys] == []
    doc = (Path(__file__).resolve().parents[2] / "docs" / "from_trl.md").read_text()
    printed = dict(re.findall(r"^\| `(\w+)` \| `([\w.]+)` \|", doc, re.M))
    assert printed == {name: key for name, (key, _) in TRL_NAMES.items()}
