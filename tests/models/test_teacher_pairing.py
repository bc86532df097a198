import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.config.sections import PairingConfig, SamplingConfig
from opd.engines.hf import HFSampler
from opd.models.loading import ModelLoadError, load_model, load_tokenizer, resolve_path
from opd.models.pairing import PairingError, check_pairing
from opd.models.prompts import encode_prompt
from opd.teachers.model import ModelTeacher
from opd.worlds.tokenizer import CHAT_TEMPLATE, build_char_tokenizer


@pytest.fixture(scope="module")
def pair(tiny_models):
    teacher, student = (AutoModelForCausalLM.from_pretrained(p) for p in tiny_models)
    return teacher, student


def test_teacher_token_logprobs_match_a_plain_forward(pair, tokenizer):
    teacher_model, student = pair
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": t}]) for t in ["1+1", "123+456"]]
    r = HFSampler(student, tokenizer).sample(prompts, SamplingConfig(max_new_tokens=8), torch.Generator().manual_seed(0))
    teacher = ModelTeacher(teacher_model)
    logp_BC = teacher.token_logprobs(r)
    for row in range(2):
        ids = r.input_ids_BL()[row][r.attention_mask_BL()[row].bool()]
        with torch.no_grad():
            full = teacher_model(ids[None]).logits[0].log_softmax(-1)
        n_prompt = int(r.prompt_mask_BP[row].sum())
        expected = full[n_prompt - 1 : -1].gather(-1, ids[n_prompt:, None]).squeeze(-1)
        torch.testing.assert_close(logp_BC[row, : len(expected)], expected, atol=1e-5, rtol=1e-5)
    assert not logp_BC.requires_grad
    assert all(not p.requires_grad for p in teacher_model.parameters())


def test_pairing_accepts_identical_tokenizers(pair, tokenizer):
    teacher, student = pair
    assert check_pairing(tokenizer, build_char_tokenizer(), student, teacher, full_vocab=True) == []


def test_pairing_refuses_different_eos(pair, tokenizer):
    teacher, student = pair
    other = build_char_tokenizer()
    other.eos_token = "<pad>"
    with pytest.raises(PairingError, match=r"EOS ids differ \(student 2, teacher 0\)"):
        check_pairing(tokenizer, other, student, teacher, full_vocab=False)


def test_pairing_refuses_a_different_vocabulary(pair, tokenizer):
    teacher, student = pair
    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(PairingError, match="tokenizer vocabularies differ"):
        check_pairing(tokenizer, other, student, teacher, full_vocab=False)


def test_a_different_split_shows_the_text_and_both_id_sequences(pair, tokenizer):
    """A teacher tokenizer with one extra merged token ("42"): the refusal shows the sample text and how each side split it."""
    from opd.models.pairing import ROUND_TRIP_TEXT

    teacher, student = pair
    other = build_char_tokenizer()
    other.add_tokens(["42"])
    ids = lambda tok: tok(ROUND_TRIP_TEXT, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids(tokenizer) != ids(other)
    with pytest.raises(PairingError) as err:
        check_pairing(tokenizer, other, student, teacher, full_vocab=False)
    assert f"split the same text into different ids ({ROUND_TRIP_TEXT!r}: student {ids(tokenizer)}, teacher {ids(other)})" in str(err.value)


def test_pairing_template_mismatch_is_an_error_or_a_warning(pair, tokenizer):
    teacher, student = pair
    other = build_char_tokenizer()
    other.chat_template = CHAT_TEMPLATE.replace("<|assistant|>", "<|user|>")
    with pytest.raises(PairingError, match="chat templates render differently.*pairing.allow_chat_template_mismatch"):
        check_pairing(tokenizer, other, student, teacher, full_vocab=False)
    with pytest.warns(UserWarning, match="chat templates render differently"):
        check_pairing(tokenizer, other, student, teacher, full_vocab=False, pairing=PairingConfig(allow_chat_template_mismatch=True))


def test_a_teacher_padded_beyond_the_student_pairs_and_is_cut_to_the_students_rows(tiny_models, tokenizer):
    import torch

    from opd.models.loading import match_output_vocabulary

    teacher, student = (AutoModelForCausalLM.from_pretrained(p) for p in tiny_models)
    padded = AutoModelForCausalLM.from_pretrained(tiny_models[0])
    padded.resize_token_embeddings(len(tokenizer) + 5)  # a larger family member's extra rows
    assert check_pairing(tokenizer, tokenizer, student, padded, full_vocab=True) == []
    assert match_output_vocabulary(padded, student) and padded.get_output_embeddings().weight.shape[0] == len(tokenizer)
    ids = torch.tensor([tokenizer("12+30=42")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(padded(ids).logits, teacher(ids).logits)  # the shared ids' logits are the teacher's own
    # the other way round a full-vocabulary loss has no teacher probability for the student's extra ids
    student.resize_token_embeddings(len(tokenizer) + 5)
    with pytest.raises(PairingError, match=r"the teacher's output layer has fewer rows \(103\) than the student's \(108\)"):
        check_pairing(tokenizer, tokenizer, student, teacher, full_vocab=True)
    assert check_pairing(tokenizer, tokenizer, student, teacher, full_vocab=False) == []


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        resolve_path(str(tmp_path / "nowhere"), "teacher.path")
    assert str(err.value) == (
        f"teacher.path: no model at '{tmp_path / 'nowhere'}' "
        "(give a local HF checkpoint directory, a Hub repo id in the local cache, or one of "
        "world:teacher, world:student, world:teacher_base, world:student_privileged, world:teacher_bpe)"
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no config.json"):
        load_model(str(tmp_path / "empty"), "student.path")
    with pytest.raises(ModelLoadError, match="student.path: no model at 'Qwen/Qwen3-0.6B'"):
        load_tokenizer("Qwen/Qwen3-0.6B", "student.path")


def test_unknown_world_model_is_named():
    with pytest.raises(ModelLoadError, match=r"teacher.path: unknown world model 'teachr' \(choose world:teacher, world:student, world:teacher_base, world:student_privileged, world:teacher_bpe\)"):
        resolve_path("world:teachr", "teacher.path")
