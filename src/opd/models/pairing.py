"""The teacher/student pairing check: a teacher (or reference, or served model) whose token ids would not mean what the
student's mean is refused before any training, naming every mismatch."""

from __future__ import annotations

import warnings

from .loading import output_size


class PairingError(ValueError):
    """Teacher and student cannot be trained together as configured."""


PAIRING_SAMPLE = [{"role": "user", "content": "What is 12+30? Think step by step."}]
ROUND_TRIP_TEXT = "12+30=42, so the answer is \\boxed{42}."


def check_pairing(student_tok, teacher_tok, student_model, teacher_model, full_vocab: bool, allow_template_mismatch: bool):
    """Refuse a teacher whose token ids would not mean what the student's mean.

    Checked: vocabulary (size and token→id map), EOS and pad ids, the chat template rendered
    on a sample conversation, and a tokenise/detokenise round trip. Returns the list of
    warnings issued (mismatches under which training stays meaningful).
    """
    problems, notes = [], []
    s_vocab, t_vocab = output_size(student_model), output_size(teacher_model)
    if len(student_tok) > min(s_vocab, t_vocab):
        problems.append(f"the tokenizer has {len(student_tok)} tokens but the {'student' if s_vocab < t_vocab else 'teacher'} "
                        f"outputs only {min(s_vocab, t_vocab)}")
    elif t_vocab < s_vocab and full_vocab:
        problems.append(
            f"the teacher's output layer has fewer rows ({t_vocab}) than the student's ({s_vocab}), so it gives no "
            "probability for the student's extra (padding) ids; a full-vocabulary loss needs the teacher at least as wide"
        )
    tok_problems, tok_notes = tokenizer_problems(student_tok, teacher_tok, allow_template_mismatch)
    return raise_pairing(problems + tok_problems, notes + tok_notes)


def tokenizer_problems(student_tok, teacher_tok, allow_template_mismatch: bool) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` of two tokenizers: vocabulary, EOS and pad ids, a round trip, the chat template."""
    problems, notes = [], []
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        problems.append(f"tokenizer vocabularies differ (student {len(student_tok)} tokens, teacher {len(teacher_tok)})")
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        problems.append(f"EOS ids differ (student {student_tok.eos_token_id}, teacher {teacher_tok.eos_token_id})")
    if student_tok.pad_token_id != teacher_tok.pad_token_id:
        notes.append(f"pad ids differ (student {student_tok.pad_token_id}, teacher {teacher_tok.pad_token_id}); padding is masked, so this is harmless")
    s_ids = student_tok(ROUND_TRIP_TEXT, add_special_tokens=False)["input_ids"]
    t_ids = teacher_tok(ROUND_TRIP_TEXT, add_special_tokens=False)["input_ids"]
    if s_ids != t_ids:
        problems.append(f"the two tokenizers split the same text into different ids ({ROUND_TRIP_TEXT!r}: student {s_ids}, teacher {t_ids})")
    if student_tok.decode(s_ids) != teacher_tok.decode(s_ids):
        problems.append(
            f"the two tokenizers decode the same ids into different text ({s_ids}: student {student_tok.decode(s_ids)!r}, "
            f"teacher {teacher_tok.decode(s_ids)!r})"
        )
    s_template = _render(student_tok)
    t_template = _render(teacher_tok)
    if s_template != t_template:
        message = (
            "chat templates render differently "
            f"(student {s_template!r}, teacher {t_template!r}); the teacher scores prompts in the student's format"
        )
        if allow_template_mismatch:
            notes.append(message)
        else:
            problems.append(message + " (set pairing.allow_chat_template_mismatch=true if that is intended)")
    return problems, notes


def raise_pairing(problems: list[str], notes: list[str]) -> list[str]:
    """Raise ``PairingError`` naming every problem; else warn each note and return the notes."""
    if problems:
        raise PairingError("teacher and student do not pair: " + "; ".join(problems))
    for note in notes:
        warnings.warn(f"teacher/student pairing: {note}", stacklevel=3)
    return notes


def _render(tokenizer) -> str | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.apply_chat_template(PAIRING_SAMPLE, tokenize=False, add_generation_prompt=True)
