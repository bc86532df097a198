"""A user's own data and model pair, on a foreign world the tests build (Qwen3 architecture, byte-level BPE, ChatML,
a teacher padded beyond the tokenizer): row shapes, files, splits, the pre-flight pass, grading, LoRA targets."""

import json
import random
import re

import pytest
from foreign_world import build_pair, chat_rows, prompt_rows, write_jsonl

from opd.cli import main
from opd.config.loading import load_config
from opd.tasks import DataError, MathTask
from opd.tasks.math import MathConfig
from opd.training.loop import train


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("foreign"))


def run_config(tmp_path, pair, data, *overrides, name="run"):
    student, teacher = pair
    base = [
        f"run.output_dir={tmp_path / name}", f"student.path={student}", f"teacher.path={teacher}", "task.name=math",
        f"task.path={data}", "train.steps=2", "train.prompts_per_step=4", "train.lr=1e-3", "train.precision=fp32",
        "sampling.samples_per_prompt=2", "sampling.max_new_tokens=8", "eval.every=0", "eval.teacher=false",
        "checkpoint.every=0", "checkpoint.at_end=false", "log.progress_bar=false", "log.tensorboard=false", "log.plot=false",
    ]
    return load_config(None, base + list(overrides))


def test_the_foreign_pair_is_what_users_bring(pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student, teacher = pair
    tok = AutoTokenizer.from_pretrained(student)
    assert tok.backend_tokenizer.pre_tokenizer.__class__.__name__ == "ByteLevel"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    t = AutoModelForCausalLM.from_pretrained(teacher)
    assert t.config.model_type == "qwen3" and t.get_output_embeddings().weight.shape[0] == len(tok) + 64


@pytest.mark.parametrize(
    "method, extra",
    [
        ("opd", []),
        ("gkd", ["method.gkd.lambda_onpolicy=0.5"]),  # full vocabulary against the padded teacher; half off-policy
        ("opsd", ["teacher.path=null"]),  # the student is its own teacher, reading the final assistant turn
        ("grpo", []),
    ],
)
def test_conversational_data_trains_every_kind_of_method(tmp_path, pair, method, extra):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20))
    summary = train(run_config(tmp_path, pair, data, f"method.name={method}", *extra))
    # a random student earns no reward, so GRPO's groups carry no signal; the distillation methods train
    assert summary["trained"] == (method != "grpo") and summary["student_accuracy_after"] is not None
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward" in r for r in rows if r["kind"] == "train" and method != "gkd")
    assert summary["eval_set"]["rows"] == summary["eval_set"]["evaluated"] == 2  # 10% of 20, announced
    assert summary["data_checks"]["train"] == {"rows": 18, "kept": 18, "skipped_too_long": 0, "truncated": 0, "empty": 0}


def test_prompt_only_data_distils_and_a_reward_method_says_what_is_missing(tmp_path, pair):
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(12))
    summary = train(run_config(tmp_path, pair, data, "method.name=opd"))
    assert summary["trained"] and summary["student_accuracy_after"] is None  # nothing to grade
    assert summary["eval_after"]["graded"] == 0 and summary["eval_after"]["rows"] == 1
    # full vocabulary on the student's own samples (against the padded teacher) needs no solution either
    assert train(run_config(tmp_path, pair, data, "method.name=gkd", "method.gkd.lambda_onpolicy=1.0", name="gkd"))["trained"]
    with pytest.raises(DataError, match=r"prompts.jsonl:\d+: no answer, and the method trains on the task's rewards.*; 11 of 11 training rows lack one"):
        train(run_config(tmp_path, pair, data, "method.name=grpo", name="grpo"))
    with pytest.raises(DataError, match=r"no solution, and the method uses reference solutions"):
        train(run_config(tmp_path, pair, data, "method.name=sft", name="sft"))


def test_row_shapes_and_file_types_read_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "A \\boxed{1}"}], "answer": 1},
        {"prompt": [{"role": "user", "content": "b?"}], "completion": [{"role": "assistant", "content": "B"}]},
        {"prompt": "c?", "completion": "C", "answer": "3"},
        {"problem": "d?", "solution": "D", "answer": "4"},
    ]
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    pq.write_table(pa.Table.from_pylist([rows[2], {"prompt": "e?", "completion": "E", "answer": "5"}]), tmp_path / "d.parquet")
    for path in (write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "d.json"):
        task = MathTask(str(path), MathConfig(path=str(path), eval_path=str(path)))
        got = [(e.prompt, e.solution, e.answer, e.meta["shape"]) for e in task.eval_examples()]
        assert got == [("a?", "A \\boxed{1}", "1", "messages"), ("b?", "B", None, "prompt"), ("c?", "C", "3", "prompt"),
                       ("d?", "D", "4", "problem")]
    parquet = MathTask(str(tmp_path / "d.parquet"), MathConfig(path=str(tmp_path / "d.parquet"), eval_path=str(tmp_path / "d.parquet")))
    assert [e.prompt for e in parquet.eval_examples()] == ["c?", "e?"]
    assert parquet.eval_examples()[0].meta["source"].endswith("d.parquet[0]")


def test_prompts_get_the_system_prompt_and_instruction_by_shape(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a?"}]}, {"problem": "b?", "answer": "2"},
            {"messages": [{"role": "system", "content": "mine"}, {"role": "user", "content": "c?"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    task = MathTask(str(path), MathConfig(path=str(path), eval_path=str(path), system_prompt="Be brief."))
    chat, problem, own_system = (task.messages(e) for e in task.eval_examples())
    assert chat == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a?"}]  # no suffix for chat
    assert problem[1]["content"].startswith("b?\n\n") and "\\boxed{}" in problem[1]["content"]
    assert own_system[0] == {"role": "system", "content": "mine"}  # a row's own system turn is kept
    plain = MathTask(str(path), MathConfig(path=str(path), eval_path=str(path), instruction=""))
    assert plain.messages(plain.eval_examples()[1]) == [{"role": "user", "content": "b?"}]


def test_chat_template_kwargs_reach_the_template(tmp_path, pair):
    from transformers import AutoTokenizer

    from opd.models.prompts import render_prompt

    tok = AutoTokenizer.from_pretrained(pair[0])
    messages = [{"role": "user", "content": "hi"}]
    assert render_prompt(tok, messages).endswith("<|im_start|>assistant\n")
    assert render_prompt(tok, messages, {"enable_thinking": False}).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    cfg = load_config(None, ["student.path=s", "teacher.path=t", "task.chat_template_kwargs.enable_thinking=false"])
    assert cfg.task.chat_template_kwargs == {"enable_thinking": False}


def test_a_dataset_dicts_splits_are_used_and_named(tmp_path):
    import datasets

    def split(n, offset):
        return datasets.Dataset.from_list([{"problem": f"p{offset + i}", "answer": str(i)} for i in range(n)])

    datasets.DatasetDict({"train": split(30, 0), "test": split(7, 100)}).save_to_disk(str(tmp_path / "dd"))
    task = MathTask(str(tmp_path / "dd"), MathConfig(path=str(tmp_path / "dd")))
    assert len(task.splits()["train"]) == 30 and len(task.eval_examples()) == 7  # the whole test split, nothing held out
    assert task.describe_eval() == {"source": f"{tmp_path / 'dd'}[test]", "rows": 7}
    datasets.DatasetDict({"tr": split(5, 0), "dev": split(3, 50)}).save_to_disk(str(tmp_path / "custom"))
    named = MathTask(str(tmp_path / "custom"), MathConfig(path=str(tmp_path / "custom"), split="tr", eval_split="dev"))
    assert [len(named.splits()["train"]), len(named.eval_examples())] == [5, 3]
    with pytest.raises(DataError, match=r"the DatasetDict has no split 'train' \(it has: tr, dev; set task.split / task.eval_split\)"):
        MathTask(str(tmp_path / "custom"), MathConfig(path=str(tmp_path / "custom")))


def test_holding_out_is_announced_and_sized(tmp_path, caplog):
    import logging

    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": f"p{i}", "answer": "1"} for i in range(40)])
    with caplog.at_level(logging.WARNING, logger="opd.tasks.math"):
        task = MathTask(str(path), MathConfig(path=str(path)))
    assert len(task.eval_examples()) == 4 and len(task.splits()["train"]) == 36
    assert "holding out 4 of the 40 rows" in caplog.text and "task.eval_size" in caplog.text
    assert len(MathTask(str(path), MathConfig(path=str(path), eval_size=15)).eval_examples()) == 15
    with pytest.raises(DataError, match="leaves none of its 40 for training"):
        MathTask(str(path), MathConfig(path=str(path), eval_size=40))


def test_opd_eval_data_evaluates_every_row(tmp_path, pair, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", chat_rows(20))
    assert main(["eval", str(pair[0]), "--data", str(data), "sampling.max_new_tokens=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"] == 20 and out["rows"] == out["graded"] == 20 and out["eval_set"] == {"source": str(data), "rows": 20}


def test_an_overlong_row_is_skipped_and_counted_or_truncated_to_fit(tmp_path, pair):
    rows = chat_rows(20)
    rows[3]["messages"][1]["content"] = "What is " + "one plus " * 200 + "one?"
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    common = ["method.name=opd", f"task.eval_path={write_jsonl(tmp_path / 'eval.jsonl', chat_rows(3))}"]
    summary = train(run_config(tmp_path, pair, data, *common))
    assert summary["data_checks"]["train"] == {"rows": 20, "kept": 19, "skipped_too_long": 1, "truncated": 0, "empty": 0}
    truncated = train(run_config(tmp_path, pair, data, *common, "task.too_long=truncate", name="trunc"))
    assert truncated["data_checks"]["train"]["truncated"] == 1 and truncated["data_checks"]["train"]["kept"] == 20

    from opd.training.assembly import build_session

    s = build_session(run_config(tmp_path, pair, data, *common, "task.too_long=truncate", name="inspect"))
    cut = next(e for e in s.task.splits()["train"] if e.meta.get("truncated"))
    assert cut.prompt.endswith("one plus one?") and not cut.prompt.startswith("What is")
    from opd.models.prompts import encode_prompt

    assert len(encode_prompt(s.tokenizer, s.task.messages(cut))) <= s.max_prompt_tokens


def test_grading_reads_only_the_final_box_or_the_configured_pattern(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "p", "answer": "42"}])
    task = MathTask(str(path), MathConfig(path=str(path), eval_path=str(path)))
    ex = task.eval_examples()[0]
    assert task.reward("garbage 17 tokens 42", ex) == 0.0  # no box, no reward
    assert task.reward("first \\boxed{41}, then \\boxed{42}", ex) == 1.0
    assert task.reward("\\boxed{42} but finally \\boxed{17}", ex) == 0.0
    assert task.reward("\\boxed{\\frac{84}{2}}", ex) == 1.0
    patterned = MathTask(str(path), MathConfig(path=str(path), eval_path=str(path), answer_pattern=r"Answer:\s*(\S+)"))
    assert patterned.reward("17 tokens. Answer: 42", ex) == 1.0 and patterned.reward("\\boxed{42}", ex) == 0.0


@pytest.mark.parametrize("targets", ["[q_proj, v_proj]", "q_proj", "q_proj,v_proj"])
def test_lora_targets_as_a_list_or_names(tmp_path, pair, targets):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    cfg = run_config(tmp_path, pair, data, "method.name=opd", "student.lora.enabled=true", f"student.lora.target_modules={targets}", "student.lora.r=2")
    summary = train(cfg)
    assert summary["trained"]
    adapter = json.loads((tmp_path / "run" / "final" / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == ({"q_proj"} if targets == "q_proj" else {"q_proj", "v_proj"})
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")


def test_checkpoints_are_on_by_default_and_the_last_step_is_kept(tmp_path, pair):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    cfg = run_config(tmp_path, pair, data, "method.name=opd")
    cfg.checkpoint = type(cfg.checkpoint)()  # the defaults
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002"]
    more = run_config(tmp_path, pair, data, "method.name=opd", "run.resume=true", "train.steps=3", "run.allow_changes=true")
    more.checkpoint = type(cfg.checkpoint)()
    assert train(more)["steps"] == 3  # a finished run extended from its last checkpoint


def test_the_random_module_is_untouched_by_data_loading(tmp_path):
    # the held-out shuffle uses its own seeded generator, so data loading never moves the global stream
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": f"p{i}", "answer": "1"} for i in range(20)])
    random.seed(5)
    expected = random.random()
    random.seed(5)
    MathTask(str(path), MathConfig(path=str(path)))
    assert random.random() == expected


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path):
    """The README's walkthrough, word for word: its three commands, its rewards.py, and its distil.py (the Python API
    with the reward function as an object)."""
    import os
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text()
    walkthrough = readme[readme.index("### Walkthrough"):readme.index("## Generation by vLLM")]
    block = re.search(r"```bash\n(.*?)```", walkthrough, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert [c.split()[:2] for c in commands] == [["opd", "train"], ["opd", "eval"], ["opd", "train"]]
    rewards, distil = re.findall(r"```python\n(.*?)```", walkthrough, re.S)
    student, teacher = build_pair(tmp_path / "pair", context=1024)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    work = tmp_path / "work"
    shutil.copytree(repo / "configs" / "own_models", work / "configs" / "own_models")
    (work / "rewards.py").write_text(rewards)
    (work / "distil.py").write_text(distil)
    env = {**os.environ, "STUDENT": str(student), "TEACHER": str(teacher), "DATA": str(data),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    outputs = []
    for command in [*commands, "python distil.py"]:
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout)
    summary = json.loads((work / "runs" / "own_opd" / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["trained"] and summary["eval_set"]["rows"] == 4
    assert summary["data_checks"]["train"]["kept"] == 36
    AutoModelForCausalLM.from_pretrained(work / "runs" / "own_opd" / "final")
    evaluated = json.loads(outputs[1][outputs[1].index("{"):])
    assert evaluated["prompts"] == evaluated["rows"] == 40
    # GRPO on the README's reward function, named on the command line and given as an object: the same run
    by_name = json.loads((work / "runs" / "own_grpo" / "summary.json").read_text())
    by_object = json.loads((work / "runs" / "own_grpo_py" / "summary.json").read_text())
    assert by_name["method"] == "grpo" and by_name["steps"] == 10 and by_name["reward_errors"] == 0
    assert by_name["student_reward_after"] == by_object["student_reward_after"]
    assert outputs[3].split() == [str(by_object["student_reward_before"]), str(by_object["student_reward_after"])]
    steps = [json.loads(line) for line in (work / "runs" / "own_grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in steps if r["kind"] == "train"] == [
        r["loss"] for r in map(json.loads, (work / "runs" / "own_grpo_py" / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"
    ]


def test_review_edge_cases_of_reading_and_grading(tmp_path):
    import re as _re

    import datasets

    from opd.models.loading import lora_targets
    from opd.tasks.math import extract_answer, final_boxed

    assert final_boxed("\\boxed{3} then \\boxed{4") is None  # a cut-off final box is no answer, not the earlier one
    assert extract_answer("ANSWER=7", _re.compile(r"answer is (\d+)|ANSWER=(\d+)")) == "7"
    assert lora_targets("self_attn.q_proj") == ["self_attn.q_proj"] and lora_targets(["all-linear"]) == "all-linear"
    (tmp_path / "one.json").write_text('\ufeff{"messages": [{"role": "user", "content": "hi"}]}')  # one row, with a BOM
    one = MathTask(str(tmp_path / "one.json"), MathConfig(path=str(tmp_path / "one.json"), eval_path=str(tmp_path / "one.json")))
    assert [e.prompt for e in one.eval_examples()] == ["hi"]

    def split(n):
        return datasets.Dataset.from_list([{"problem": f"p{i}", "answer": "1"} for i in range(n)])

    datasets.DatasetDict({"train": split(3), "validation": split(4), "test": split(5)}).save_to_disk(str(tmp_path / "dd"))
    on_test = MathTask(str(tmp_path / "dd"), MathConfig(path=str(tmp_path / "dd"), split="test"))
    assert len(on_test.splits()["train"]) == 5 and on_test.describe_eval()["source"].endswith("[validation]")


def test_opd_eval_data_on_a_dataset_dict_without_a_train_split(tmp_path, pair, capsys):
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(chat_rows(6))}).save_to_disk(str(tmp_path / "dd"))
    assert main(["eval", str(pair[0]), "--data", str(tmp_path / "dd"), "sampling.max_new_tokens=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"] == 6 and out["eval_set"]["source"].endswith("[test]")


def test_a_prompt_only_run_plots_and_whitespace_user_turns_are_dropped(tmp_path, pair):
    rows = prompt_rows(12) + [{"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "   "}]}]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = run_config(tmp_path, pair, data, "method.name=opd", "log.plot=true", f"task.eval_path={write_jsonl(tmp_path / 'e.jsonl', prompt_rows(2))}")
    summary = train(cfg)
    assert (tmp_path / "run" / "curves.png").is_file() and summary["data_checks"]["train"]["empty"] == 1


def test_sft_with_privileged_rows_has_its_privileged_prompts_checked():
    from opd.methods import method_class

    cfg = load_config(None, ["student.path=s", "method.name=sft", "method.sft.privileged_fraction=0.5"])
    assert method_class("sft").needs(cfg).privileged


def test_chat_rows_without_an_answer_are_graded_against_their_final_box(tmp_path, pair, caplog):
    """TRL-style conversations carry their answer in the final assistant turn: with no answer field, its last
    \\boxed{} is the row's answer (announced, counted in data_checks), so the student's accuracy is measured;
    task.answer_from_solution=false keeps such rows ungraded."""
    import logging

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20, with_answer=False))
    task = MathTask.from_config(MathConfig(path=str(data)))
    examples = task.splits()["train"] + task.eval_examples()
    assert all(e.answer == str(sum(map(int, re.findall(r"\d+", e.prompt)[:2]))) for e in examples)
    caplog.set_level(logging.INFO, logger="opd")
    summary = train(run_config(tmp_path, pair, data, "method.name=opd"))
    assert summary["student_accuracy_after"] is not None and summary["eval_after"]["graded"] == 2
    assert summary["data_checks"]["train"]["answers_from_solutions"] == 18
    assert "20 rows have no 'answer' field: each is graded against the last \\boxed{} of its reference solution" in caplog.text
    plain = MathTask.from_config(MathConfig(path=str(data), answer_from_solution=False))
    assert all(e.answer is None for e in plain.splits()["train"])


@pytest.mark.slow
def test_a_dataset_named_by_its_hub_id_is_read_from_the_local_cache(tmp_path, tiny_models):
    """task.path=org/name with the dataset in a real hub cache on disk (parquet files named by split, as the Hub lays
    out a dataset): its test split is evaluated, read offline in a fresh process."""
    import io
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import hub_cache

    def parquet(n: int, offset: int) -> bytes:
        buffer = io.BytesIO()
        pq.write_table(pa.table({"prompt": [f"{100 + i + offset}+1=" for i in range(n)], "answer": [str(101 + i + offset) for i in range(n)]}), buffer)
        return buffer.getvalue()

    cache = hub_cache(tmp_path / "hub", "my-org/sums", {"data/train-00000-of-00001.parquet": parquet(12, 0),
                                                          "data/test-00000-of-00001.parquet": parquet(5, 50)}, repo_type="dataset")
    env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")}
    run = lambda *args: subprocess.run([sys.executable, "-m", "opd", *args], env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    done = run("eval", str(tiny_models[1]), "--data", "my-org/sums", "sampling.max_new_tokens=4")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["prompts"] == 5 and summary["eval_set"]["source"] == "my-org/sums[test]"  # the test split, all 5 rows


def test_a_dataset_name_the_cache_lacks_says_how_to_fetch_it():
    from opd.services.hub import cache_location

    with pytest.raises(DataError) as err:
        MathTask.from_config(MathConfig(path="my-org/not-fetched"))
    assert str(err.value) == (
        f"my-org/not-fetched: no such file, and the Hugging Face cache ({cache_location()}) holds no dataset of that name; "
        "opd never downloads: fetch it beforehand (huggingface-cli download --repo-type dataset my-org/not-fetched), or save it "
        "with datasets' save_to_disk and give that directory"
    )


def base_student(tmp_path, pair):
    """The foreign student as a base checkpoint: the same weights and tokenizer, no chat template."""
    import shutil

    base = tmp_path / "base_student"
    shutil.copytree(pair[0], base)
    (base / "chat_template.jinja").unlink()
    return base


def test_a_student_without_a_chat_template_gets_one_from_the_config(tmp_path, pair):
    from transformers import AutoTokenizer

    from opd.config.sections import ConfigError
    from opd.models.pairing import PairingError

    student, teacher = base_student(tmp_path, pair), pair[1]
    assert AutoTokenizer.from_pretrained(student).chat_template is None
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    # without one, the pairing check refuses and says which key gives the student a template
    with pytest.raises(PairingError, match=r"chat templates render differently \(student None.*student.chat_template gives it one"):
        train(run_config(tmp_path, (student, teacher), data, name="refused"))
    template_file = teacher / "chat_template.jinja"
    for name, value in [("file", str(template_file)), ("text", template_file.read_text())]:
        summary = train(run_config(tmp_path, (student, teacher), data, f"student.chat_template={value}", "checkpoint.at_end=true", name=name))
        assert summary["trained"]
        final = AutoTokenizer.from_pretrained(tmp_path / name / "final")  # the checkpoint renders prompts as training did
        rendered = final.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ConfigError, match=r"^config key 'student.chat_template' names no file 'nowhere.jinja'"):
        run_config(tmp_path, pair, data, "student.chat_template=nowhere.jinja")
    with pytest.raises(ConfigError, match=r"^config key 'student.chat_template' is not a Jinja template: .*\(line 1\)"):
        run_config(tmp_path, pair, data, "student.chat_template={% for m in messages %}{{ m }}")


def test_the_same_tokenizer_files_loaded_as_another_class_are_named_and_can_be_allowed(tmp_path, pair):
    """A Qwen2-architecture teacher saved with the student's very tokenizer files: transformers loads its tokenizer as
    Qwen2Tokenizer (from config.json's model_type), which splits digits one by one. Every id still means the same token."""
    import filecmp

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    student, _ = pair
    tok = AutoTokenizer.from_pretrained(student)
    torch.manual_seed(3)
    teacher = tmp_path / "qwen2_teacher"
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=160, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    assert filecmp.cmp(student / "tokenizer.json", teacher / "tokenizer.json", shallow=False)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    from opd.models.pairing import PairingError

    with pytest.raises(PairingError, match=r"split the same text into different ids .*different classes \(student TokenizersBackend, "
                                        r"teacher Qwen2Tokenizer.*set pairing.allow_tokenization_mismatch=true"):
        train(run_config(tmp_path, (student, teacher), data, name="refused"))
    with pytest.warns(UserWarning, match="split the same text into different ids"):
        assert train(run_config(tmp_path, (student, teacher), data, "pairing.allow_tokenization_mismatch=true", name="allowed"))["trained"]
