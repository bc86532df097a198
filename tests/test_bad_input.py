"""Bad input, through the command line as a user meets it: every case is one line 'opd: error: …' naming what is
wrong, exit status 2, before any training — never a traceback, never silently accepted."""

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
    (GOOD, ["train.device=bogus"], "'train.device' must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    (GOOD, ["train.device=cuda"], "'train.device' is 'cuda' but CUDA is not available here"),
    (GOOD, ["train.grad_accum=3"], "'train.grad_accum' must divide train.prompts_per_step (16), got 3"),
    (GOOD, ["train.steps=lots"], "'train.steps' must be an integer, got 'lots'"),
    (GOOD, ["sampling.top_p=0"], "'sampling.top_p' must be in (0, 1], got 0.0"),
    (GOOD, ["method.name=dpo"], "'method.name' must be one of"),
    (GOOD, ["task.name=poetry"], "'task.name' must be one of 'arithmetic', 'math', got 'poetry'"),
    (GOOD, ["task.path=x.jsonl"], "'task.path' belongs to task.name=math, not task.name=arithmetic"),
    (GOOD, ["task.name=math"], "'task.path' is required for task.name=math"),
    (GOOD, ["method.name=grpo", "method.clip_eps=0.2"], "'method.clip_eps' has no effect with train.updates_per_batch=1"),
    (GOOD, ["method.name=opsd", "teacher.path=null", "sampling.temperature=0"], "'method.opsd.temperature' must be set when sampling.temperature=0"),
    (GOOD, ["method.name=opsd"], "'teacher.path' must be null for opsd"),
    (GOOD, ["method.name=gkd", "teacher.path=null"], "'teacher.path' is required by method 'gkd'"),
    (GOOD, ["run.output_dir="], "'run.output_dir' must name a directory"),
    (GOOD, ["student.lora.r=0"], "'student.lora.r' must be >= 1, got 0"),
    (GOOD, ["method.ovd.http.url=http://x", "method.name=ovd", "method.ovd.judge=http", "method.ovd.http.timeout=0"], "'method.ovd.http.timeout' must be > 0"),
    (GOOD, ["teacher.temperature=0"], "'teacher.temperature' must be > 0"),
    (GOOD, ["badoverride"], "override 'badoverride' must look like key.path=value"),
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
        (b'{"problem": "1+1"}\n', "data.jsonl:1: missing field 'answer'"),
        (b'[1, 2]\n', "data.jsonl:1: expected a JSON object, got list"),
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
