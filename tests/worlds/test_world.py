"""The embedded world: tokenizer and checkpoints load back through the Auto classes."""

import json

from conftest import TINY_SPEC
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.worlds.build.arithmetic import build_world


def test_char_tokenizer_round_trip_and_chat_template(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "7+9=16,4+8+1=13|936 Hello, world!\n"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and loaded.decode(ids) == text
    prompt = loaded.apply_chat_template([{"role": "user", "content": "1+2"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><|user|>1+2<|assistant|>"
    assert loaded.padding_side == "left"
    assert loaded(prompt, add_special_tokens=False)["input_ids"][:2] == [loaded.bos_token_id, loaded.convert_tokens_to_ids("<|user|>")]


def test_build_world_is_deterministic_and_loadable(tmp_path):
    from dataclasses import replace

    spec = replace(TINY_SPEC, teacher_steps=3, student_steps=1, batch_size=4, warmup_steps=0, teacher_base_step=2)
    first = build_world(tmp_path / "w1", spec, progress=False)
    second = build_world(tmp_path / "w2", spec, progress=False)
    for role in ("teacher", "student", "student_privileged", "teacher_bpe"):
        assert (first / role / "model.safetensors").read_bytes() == (second / role / "model.safetensors").read_bytes()
        model = AutoModelForCausalLM.from_pretrained(first / role)
        tok = AutoTokenizer.from_pretrained(first / role)
        assert model.config.eos_token_id == tok.eos_token_id and model.config.vocab_size == len(tok)
    # teacher_bpe reads the same texts in tokens of its own: a digit fused with the operators after it
    bpe, char = AutoTokenizer.from_pretrained(first / "teacher_bpe"), AutoTokenizer.from_pretrained(first / "student")
    assert bpe.tokenize("7+9=16,4|936") == ["7+", "9=", "1", "6,", "4|", "9", "3", "6"]
    assert bpe.get_vocab() != char.get_vocab() and bpe.decode(bpe("7+9=16|16")["input_ids"]) == "7+9=16|16"
    assert (first / "teacher_bpe" / "tokenizer.json").read_bytes() == (second / "teacher_bpe" / "tokenizer.json").read_bytes()
    assert (first / "world.json").is_file() and not list(tmp_path.glob("*.building-*"))
    base = AutoModelForCausalLM.from_pretrained(first / "teacher_base").state_dict()
    final = AutoModelForCausalLM.from_pretrained(first / "teacher").state_dict()
    assert any(not (base[k] == final[k]).all() for k in final)  # one more SFT step apart
    assert not (first / "teacher-sft" / "checkpoints").exists()
    # student_privileged starts from the student's init and differs only by its privileged-prompt examples
    student = AutoModelForCausalLM.from_pretrained(first / "student").state_dict()
    privileged = AutoModelForCausalLM.from_pretrained(first / "student_privileged").state_dict()
    assert any(not (student[k] == privileged[k]).all() for k in student)


def test_world_rebuild_reuses_unchanged_roles_and_retrains_changed_ones(tmp_path):
    from dataclasses import replace

    spec = replace(TINY_SPEC, teacher_steps=2, student_steps=1, batch_size=4, warmup_steps=0, teacher_base_step=1)
    first = build_world(tmp_path / "w1", spec, progress=False)
    changed = replace(spec, privileged_instruction="Show your work.")
    second = build_world(tmp_path / "w2", changed, progress=False, reuse=first)
    report = json.loads((second / "world.json").read_text())
    for role in ("teacher", "teacher_base", "student"):
        assert report[role]["reused_from"] == spec.fingerprint()
        assert (first / role / "model.safetensors").read_bytes() == (second / role / "model.safetensors").read_bytes()
    assert "reused_from" not in report["student_privileged"]
    assert (first / "student_privileged" / "model.safetensors").read_bytes() != (second / "student_privileged" / "model.safetensors").read_bytes()
    # a retrained role equals a from-scratch build of the changed spec
    fresh = build_world(tmp_path / "w3", changed, progress=False)
    assert (fresh / "student_privileged" / "model.safetensors").read_bytes() == (second / "student_privileged" / "model.safetensors").read_bytes()
