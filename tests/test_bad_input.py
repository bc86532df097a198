"""Bad input, through the command line as a user meets it: every case is one line 'opd: error: …' naming what is
wrong, exit status 2, before any training — never a traceback, never silently accepted."""

import json

import pytest

from opd.cli import main

GOOD = "student:\n  path: world:student\nteacher:\n  path: world:teacher\n"


def write(tmp_path, name, content: bytes | str):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


CASES = [
    # (config file content, overrides, expected fragment of the one-line error)
    (b"student:\n  path: \xff\xfe\n", [], "not UTF-8 text"),
    ("train:\n  lr: 1e-3\ntrain:\n  steps: 3\n" + GOOD, [], "key 'train' is given twice"),
    ("train:\n  lr: 1e-3\n  lr: 2e-3\n" + GOOD, [], "key 'lr' is given twice"),
    ("- a\n- b\n", [], "the top level must be a mapping of sections"),
    ("train: [1, 2\n", [], "not valid YAML"),
    (GOOD, ["train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    (GOOD, ["train.lr=.inf"], "'train.lr' must be a finite number > 0, got inf"),
    (GOOD, ["train.lr=.nan"], "'train.lr' must be a finite number > 0, got nan"),
    (GOOD, ["train.lr=-1"], "'train.lr' must be a finite number > 0"),
    (GOOD, ["train.lr=1e39"], "'train.lr' is too large for a float32 update"),
    (GOOD, ["train.device=bogus"], "'train.device' must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    (GOOD, ["train.device=cuda"], "'train.device' is 'cuda' but CUDA is not available here"),
    (GOOD, ["train.grad_accum=3"], "'train.grad_accum' must divide train.prompts_per_step (16), got 3"),
    (GOOD, ["train.steps=lots"], "'train.steps' must be an integer, got 'lots'"),
    (GOOD, ["sampling.top_p=0"], "'sampling.top_p' must be in (0, 1], got 0.0"),
    (GOOD, ["method.name=dpo"], "'method.name' must be one of"),
    (GOOD, ["task.name=poetry"], "'task.name' must be one of 'arithmetic', 'math', 'code', 'environment', 'search_qa', got 'poetry'"),
    (GOOD, ["task.path=x.jsonl"], "'task.path' belongs to task.name=math or code, not task.name=arithmetic"),
    (GOOD, ["task.name=math"], "'task.path' is required for task.name=math"),
    (GOOD, ["method.name=grpo", "method.clip_eps=0.2"], "'method.clip_eps' has no effect with train.updates_per_batch=1"),
    (GOOD, ["method.name=opsd", "teacher.path=null", "sampling.temperature=0"], "'method.opsd.temperature' must be set when sampling.temperature=0"),
    (GOOD, ["method.name=opsd"], "'teacher.path' must be null for opsd"),
    (GOOD, ["method.name=gkd", "teacher.path=null"], "'teacher.path' is required by method 'gkd'"),
    (GOOD, ["run.output_dir="], "'run.output_dir' must name a directory"),
    (GOOD, ["student.lora.r=0"], "'student.lora.r' must be >= 1, got 0"),
    (GOOD, ["student.dtype=float16"], "'student.dtype' float16 full fine-tuning keeps no float32 master weights"),
    (GOOD, ["task.name=math", "task.path=d.jsonl", "task.answer_pattern=(unclosed"], "'task.answer_pattern' is not a valid regular expression"),
    (GOOD, ["task.name=math", "task.path=d.jsonl", "task.too_long=chop"], "'task.too_long' must be one of 'error', 'skip', 'truncate'"),
    (GOOD, ["method.ovd.http.url=http://x", "method.name=ovd", "method.ovd.judge=http", "method.ovd.http.deadline=0"], "'method.ovd.http.deadline' must be > 0"),
    (GOOD, ["teacher.temperature=0"], "'teacher.temperature' must be > 0"),
    # engines and served teachers (issue 12): refused when the config is read, before any model or server is touched
    (GOOD, ["sampling.sync_every=4"], "'sampling.sync_every' only applies to sampling.engine=vllm"),
    (GOOD, ["sampling.engine=vllm", "sampling.vllm.sleep=true", "train.device=cpu"], "'sampling.vllm.sleep' needs a GPU: vLLM's sleep mode frees"),
    # a student engine in its own process, overlapped with training (issue 30)
    (GOOD, ["sampling.max_staleness=-1"], "'sampling.max_staleness' must be >= 0, got -1"),
    (GOOD, ["sampling.max_staleness=1"], "'sampling.max_staleness' is 1, which generates while the trainer trains: that needs an engine in a process of its own (sampling.engine=vllm_server)"),
    (GOOD, ["sampling.engine=vllm_server", "sampling.max_staleness=1", "sampling.sync_every=2"], "'sampling.sync_every' must be 1 with sampling.max_staleness=1"),
    (GOOD, ["sampling.engine=vllm_server"], "'sampling.engine' is 'vllm_server', which starts a vLLM server with this Python, but the vllm package is not installed here"),
    (GOOD, ["sampling.engine=vllm_server", "sampling.vllm_server.python=/no/such/python"], "'sampling.vllm_server.python' is '/no/such/python', which is not an executable file"),
    (GOOD, ["sampling.engine=vllm_server", "sampling.vllm_server.url=127.0.0.1:8000"], "'sampling.vllm_server.url' must be an http(s):// URL, got '127.0.0.1:8000'"),
    (GOOD, ["sampling.engine=vllm_server", "sampling.vllm_server.model=m"], "'sampling.vllm_server.model' is for a server the user started (sampling.vllm_server.url)"),
    (GOOD, ["sampling.engine=vllm_server", "sampling.vllm_server.url=http://127.0.0.1:9", "sampling.vllm_server.transfer_dir=/no/such/dir"],
     "'sampling.vllm_server.transfer_dir' is '/no/such/dir', which is not a writable directory here"),
    # one spelling for the HTTP client's settings: the old keys name the new ones
    (GOOD, ["method.ovd.http.timeout=2"], "'method.ovd.http.timeout' is now 'method.ovd.http.deadline'"),
    (GOOD, ["method.ovd.http.max_reply_bytes=2048"], "'method.ovd.http.max_reply_bytes' is now 'method.ovd.http.max_reply_mb'"),
    (GOOD, ["sampling.engine=sglang"], "'sampling.engine' must be one of 'hf', 'vllm'"),
    (GOOD, ["teacher.url=http://127.0.0.1:9"], "'teacher.url' and teacher.path are both set; give one"),
    (GOOD, ["teacher.path=null", "teacher.url=127.0.0.1:8000"], "'teacher.url' must be an http:// or https:// URL"),
    (GOOD, ["teacher.path=null", "teacher.url=http://127.0.0.1:9", "teacher.temperature=0.8"], "'teacher.temperature' must be 1 with a served teacher"),
    (GOOD, ["teacher.path=null", "teacher.url=http://127.0.0.1:9", "method.name=gkd"], "'method.gkd.temperature' must be 1 with a served teacher"),
    (GOOD, ["teacher.path=null", "teacher.url=http://127.0.0.1:9", "teacher.api_key_env=OPD_NO_SUCH_KEY"], "'teacher.api_key_env' names OPD_NO_SUCH_KEY, which is not set"),
    (GOOD, ["teacher.path=null", "teacher.url=http://127.0.0.1:9", "teacher.concurrency=0"], "'teacher.concurrency' must be >= 1"),
    (GOOD, ["method.name=opsd", "teacher.path=null", "teacher.url=http://127.0.0.1:9"], "'teacher.url' must be null for opsd"),
    (GOOD, ["badoverride"], "override 'badoverride' must look like key.path=value"),
    # a service's outage policy (docs/cluster.md)
    (GOOD, ["teacher.path=null", "teacher.url=http://127.0.0.1:9", "teacher.outage=retry"], "'teacher.outage' must be one of 'wait', 'stop', got 'retry'"),
    (GOOD, ["teacher.path=null", "teacher.url=http://127.0.0.1:9", "teacher.outage_seconds=0"], "'teacher.outage_seconds' must be > 0 seconds"),
    (GOOD, ["method.name=ovd", "method.ovd.judge=http", "method.ovd.http.url=http://x", "method.ovd.http.outage_seconds=7200"],
     "'method.ovd.http.outage_seconds' must be below train.dist_timeout (3600 s)"),
]


@pytest.mark.parametrize("content, overrides, fragment", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_config_mistakes_are_one_line_errors(tmp_path, capsys, content, overrides, fragment):
    config = write(tmp_path, "cfg.yaml", content)
    rc = main(["train", str(config), f"run.output_dir={tmp_path / 'run'}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("opd: error: ") and fragment in err[0], err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran


def test_a_missing_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"opd: error: config file not found: {tmp_path / 'nope.yaml'}"


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_an_output_dir_that_is_not_a_directory(tmp_path, capsys, where):
    blocker = write(tmp_path, "blocker", "x")
    output = blocker if where == "file" else blocker / "run"
    config = write(tmp_path, "cfg.yaml", GOOD)
    assert main(["train", str(config), f"run.output_dir={output}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("is a file" in err[0] if where == "file" else "is under a file" in err[0])
    assert blocker.read_text() == "x"


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b'{"problem": "1+1", "answer": "2"}\n\xff\xfe\n', "not UTF-8 text"),
        (b'{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"\n', "data.jsonl:2: not valid JSON"),
        (b'{"problem": "1+1"}\n{"problem": "1+2"}\n', "no answer, and the method trains on the task's rewards"),
        (b'[1, 2]\n', "data.jsonl:1: expected an object (a row with named fields), got list"),
        (b"\n\n", "contains no rows"),
    ],
    ids=["not_utf8", "bad_json", "missing_field", "not_object", "empty"],
)
def test_data_file_mistakes_are_one_line_errors_naming_file_and_line(tmp_path, capsys, data, fragment):
    path = write(tmp_path, "data.jsonl", data)
    config = write(tmp_path, "cfg.yaml", GOOD)
    rc = main(["train", str(config), f"run.output_dir={tmp_path / 'run'}", "task.name=math", f"task.path={path}", "method.name=grpo"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("opd: error: ") and fragment in err[0], err


# ----------------------------------------------------------------------------- mistakes only the models reveal


def tiny_run(tmp_path, tiny_models, *overrides):
    teacher, student = tiny_models
    config = write(tmp_path, "cfg.yaml", "run: {name: bad}\n")
    return ["train", str(config), f"run.output_dir={tmp_path / 'run'}", f"student.path={student}", f"teacher.path={teacher}",
            "train.steps=2", "train.prompts_per_step=2", "sampling.max_new_tokens=8", "eval.num_prompts=2", "eval.every=0",
            "eval.teacher=false", "log.progress_bar=false", "log.tensorboard=false", "log.plot=false", *overrides]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("opd: error: "), err
    return err[0]


def test_lora_targets_that_match_nothing_list_the_layers_there_are(tmp_path, tiny_models, capsys):
    assert main(tiny_run(tmp_path, tiny_models, "student.lora.enabled=true", "student.lora.target_modules=[qkv, o]")) == 2
    message = one_line_error(capsys)
    assert "student.lora.target_modules=['qkv', 'o'] cannot be applied" in message and "q_proj" in message
    assert main(tiny_run(tmp_path, tiny_models, "student.lora.enabled=true", "student.lora.target_modules=qkv")) == 2
    message = one_line_error(capsys)
    assert "student.lora.target_modules='qkv' cannot be applied" in message and "q_proj" in message and "down_proj" in message


def test_a_directory_that_is_not_a_saved_dataset(tmp_path, tiny_models, capsys):
    (tmp_path / "notdata").mkdir()
    assert main(tiny_run(tmp_path, tiny_models, "task.name=math", f"task.path={tmp_path / 'notdata'}", "method.name=grpo")) == 2
    assert "is not a dataset saved by datasets.save_to_disk" in one_line_error(capsys)


def test_weights_made_non_finite_by_an_update_stop_the_run(tmp_path, tiny_models, capsys, monkeypatch):
    import torch

    real_step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):  # what float16 full fine-tuning does to a weight
        out = real_step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    assert main(tiny_run(tmp_path, tiny_models)) == 2
    assert "the update at step 1 made the student's weights non-finite" in one_line_error(capsys)


def test_an_evaluation_prompt_longer_than_the_context(tmp_path, tiny_models, capsys):
    long_row = json.dumps({"problem": "1+1=? " * 100, "answer": "2", "solution": "2"})
    data = write(tmp_path, "data.jsonl", "\n".join([long_row] * 4) + "\n")
    args = tiny_run(tmp_path, tiny_models, "task.name=math", f"task.path={data}", "method.name=sft", f"task.eval_path={data}")
    assert main(args + ["task.too_long=error"]) == 2
    message = one_line_error(capsys)
    assert "data.jsonl:1: prompt of" in message and "is longer than the" in message
    assert main(args) == 2  # skip (the default): nothing left to train on, said in one line
    assert "the train data has no usable row left: 0 of 4 rows kept; 4 too long" in one_line_error(capsys)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, tiny_models, capsys, monkeypatch):
    import errno

    import opd.training.checkpoints as checkpoint

    real = checkpoint.save_file
    calls = {"n": 0}

    def full_disk_on_the_second_checkpoint(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint writes three tensor files
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk_on_the_second_checkpoint)
    assert main(tiny_run(tmp_path, tiny_models, "checkpoint.every=1")) == 2
    assert "cannot write checkpoint" in one_line_error(capsys)
    kept = checkpoint.list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-000001"] and checkpoint.checkpoint_problem(kept[0]) is None
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_run_in_which_nothing_trained_says_so(tmp_path, tiny_models, caplog):
    import logging

    from opd.config.loading import load_config
    from opd.training.loop import train

    args = tiny_run(tmp_path, tiny_models, "method.name=grpo")[2:]  # random tiny models: every reward 0, no signal
    with caplog.at_level(logging.WARNING, logger="opd.training.loop"):
        summary = train(load_config(tmp_path / "cfg.yaml", args))
    assert summary["trained"] is False and summary["no_signal_steps"] == 2
    assert "no step of this run changed the student" in caplog.text


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_the_vllm_engine_without_vllm_installed(tmp_path, capsys):
    config = write(tmp_path, "cfg.yaml", GOOD)
    assert main(["train", str(config), f"run.output_dir={tmp_path / 'run'}", "sampling.engine=vllm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'sampling.engine' is 'vllm' but the vllm package is not installed" in err[0], err


def test_a_served_teacher_that_is_not_there_stops_the_run_before_any_model_loads(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write(tmp_path, "cfg.yaml", GOOD)
    overrides = ["teacher.path=null", f"teacher.url=http://127.0.0.1:{port}", "teacher.retries=0", "teacher.deadline=2"]
    assert main(["train", str(config), f"run.output_dir={tmp_path / 'run'}", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"teacher.url: the server at http://127.0.0.1:{port} cannot be reached" in err[0], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_model_type_transformers_does_not_know_is_one_line_naming_the_key(tmp_path, tiny_models, capsys):
    import shutil

    for key, position in (("student.path", 1), ("teacher.path", 0)):
        model = tmp_path / f"future_{key}"
        shutil.copytree(tiny_models[position], model)
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": "llama9"}))
        assert main(tiny_run(tmp_path, tiny_models, f"{key}={model}")) == 2
        message = one_line_error(capsys)
        assert message.startswith(f"opd: error: {key}: '{model}/config.json' names model_type 'llama9', which transformers")
        assert f"{key.split('.')[0]}.trust_remote_code=true" in message and "pip install" not in message


def test_weights_that_are_not_finite_are_refused_naming_the_file(tmp_path, tiny_models, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "diverged"
    shutil.copytree(tiny_models[1], model)
    weights = load_file(str(model / "model.safetensors"))
    save_file({k: v * float("nan") for k, v in weights.items()}, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert main(tiny_run(tmp_path, tiny_models, f"student.path={model}")) == 2
    message = one_line_error(capsys)
    assert message.startswith("opd: error: student.path: the weights hold NaN or infinite values: ")
    assert f"({model}/model.safetensors) and " in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_key_of_another_method_or_engine_is_named_once_as_ignored(tmp_path, tiny_models, caplog):
    import logging

    from opd.config.loading import load_config

    with caplog.at_level(logging.WARNING, logger="opd.config.loading"):
        models = [f"student.path={tiny_models[1]}", f"teacher.path={tiny_models[0]}"]
        load_config(None, [*models, "method.name=opd", "method.gkd.beta=0.9", "method.gkd.top_k=8", "sampling.vllm.gpu_memory_utilization=0.5"])
        load_config(None, [*models, "method.name=gkd", "method.gkd.beta=0.9", "method.opd.coef=1.0"])  # read, or left at its default: silent
    assert [r.getMessage() for r in caplog.records] == [
        "this run ignores method.gkd.beta, method.gkd.top_k, read only with method.name=gkd (this run's is opd); "
        "sampling.vllm.gpu_memory_utilization, read only with sampling.engine=vllm (this run's is hf)"
    ]
