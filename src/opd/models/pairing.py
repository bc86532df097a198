"""The teacher/student pairing check: a teacher (or reference, or served model) whose token ids would not mean what the
student's mean is refused before any training, naming every mismatch."""

from __future__ import annotations

import warnings

from ..config.sections import PairingConfig
from .loading import output_size


class PairingError(ValueError):
    """Teacher and student cannot be trained together as configured."""


PAIRING_SAMPLE = [{"role": "user", "content": "What is 12+30? Think step by step."}]
ROUND_TRIP_TEXT = "12+30=42, so the answer is \\boxed{42}."


def check_pairing(student_tok, teacher_tok, student_model, teacher_model, full_vocab: bool, pairing: PairingConfig = PairingConfig()):
    """Refuse a teacher whose token ids would not mean what the student's mean.

    Checked: vocabulary (size and token→id map), EOS and pad ids, the chat template rendered
    on a sample conversation, and a tokenise/detokenise round trip. Returns the list of
    warnings issued (mismatches under which training stays meaningful, or that ``pairing`` allows).
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
    tok_problems, tok_notes = tokenizer_problems(student_tok, teacher_tok, pairing)
    return raise_pairing(problems + tok_problems, notes + tok_notes)


def tokenizer_problems(student_tok, teacher_tok, pairing: PairingConfig = PairingConfig()) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` of two tokenizers: vocabulary, EOS and pad ids, a round trip, the chat template.

    Two tokenizers with the same token→id map that split a text differently (the same files loaded as different
    classes, which transformers picks from each model's ``config.json``) still mean the same thing by every id, so
    the teacher can score the student's ids; ``pairing.allow_tokenization_mismatch`` accepts that, with a warning."""
    problems, notes = [], []
    same_vocab = student_tok.get_vocab() == teacher_tok.get_vocab()
    if not same_vocab:
        problems.append(f"tokenizer vocabularies differ (student {len(student_tok)} tokens, teacher {len(teacher_tok)}; "
                        "a teacher may read the student's completions as text through its own tokenizer: "
                        "teacher.tokenizer=own, with the sampled-token methods)")
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        problems.append(f"EOS ids differ (student {student_tok.eos_token_id}, teacher {teacher_tok.eos_token_id})")
    if student_tok.pad_token_id != teacher_tok.pad_token_id:
        notes.append(f"pad ids differ (student {student_tok.pad_token_id}, teacher {teacher_tok.pad_token_id}); padding is masked, so this is harmless")
    s_ids = student_tok(ROUND_TRIP_TEXT, add_special_tokens=False)["input_ids"]
    t_ids = teacher_tok(ROUND_TRIP_TEXT, add_special_tokens=False)["input_ids"]
    same_decoding = student_tok.decode(s_ids) == teacher_tok.decode(s_ids)
    if not same_decoding:
        problems.append(
            f"the two tokenizers decode the same ids into different text ({s_ids}: student {student_tok.decode(s_ids)!r}, "
            f"teacher {teacher_tok.decode(s_ids)!r})"
        )
    if s_ids != t_ids:
        message = f"the two tokenizers split the same text into different ids ({ROUND_TRIP_TEXT!r}: student {s_ids}, teacher {t_ids})"
        s_class, t_class = type(student_tok).__name__, type(teacher_tok).__name__
        if s_class != t_class:
            message += (f"; transformers loads them as different classes (student {s_class}, teacher {t_class}: it picks the class "
                        "from each model's config.json even where the tokenizer files are the same)")
        if same_vocab and same_decoding:
            if pairing.allow_tokenization_mismatch:
                notes.append(message + "; the teacher scores the student's ids, which mean the same tokens to it")
            else:
                problems.append(message + " (every id means the same token to both: set pairing.allow_tokenization_mismatch=true "
                                          "to let the teacher score the student's splitting)")
        else:
            problems.append(message)
    s_template = _render(student_tok)
    t_template = _render(teacher_tok)
    if s_template != t_template:
        message = (
            "chat templates render differently "
            f"(student {s_template!r}, teacher {t_template!r}); the teacher scores prompts in the student's format"
        )
        if pairing.allow_chat_template_mismatch:
            notes.append(message)
        elif s_template is None:
            problems.append(message + " (the student has no chat template: student.chat_template gives it one, e.g. the "
                                      "teacher's chat_template.jinja; or set pairing.allow_chat_template_mismatch=true)")
        else:
            problems.append(message + " (set pairing.allow_chat_template_mismatch=true if that is intended)")
    return problems, notes


def check_own_tokenizer(teacher_tok, key: str = "teacher.path") -> None:
    """``teacher.tokenizer=own``: what the teacher's own tokenizer must do — split text with character offsets (a
    fast tokenizer), end a reply (an EOS token) and render the prompt in its own chat template."""
    problems = []
    if not getattr(teacher_tok, "is_fast", False):
        problems.append(f"its tokenizer ({type(teacher_tok).__name__}) gives no character offsets (a fast tokenizer, "
                        "tokenizer.json, is needed to align it with the student's)")
    if teacher_tok.eos_token_id is None:
        problems.append("its tokenizer has no EOS token (the end of the student's reply has nothing to map to)")
    if _render(teacher_tok) is None:
        problems.append("its tokenizer has no chat template to render the student's prompts in (add chat_template.jinja to it)")
    if problems:
        raise PairingError(f"{key}: a teacher with its own tokenizer (teacher.tokenizer=own) cannot be used: " + "; ".join(problems))


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
