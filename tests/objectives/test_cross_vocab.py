"""GKD's hybrid divergence for two vocabularies (objectives/cross_vocab.py), against independent formulas:

- on hand-made vocabularies, each position's value and the student's gradient equal a loop over the tokens written
  out here: D_β on the tokens both sides write (renormalised there) plus the L1 distance of the sorted leftovers;
- with one vocabulary on both sides it is GKD's generalised JSD;
- the match pairs tokens by the text they write, not by id.
"""

from __future__ import annotations

import math

import pytest
import torch

from opd.objectives.cross_vocab import (
    VocabularyMatch,
    VocabularyProjection,
    hybrid_divergence,
    match_vocabularies,
    project_vocabularies,
    projected_divergence,
    streamed_cross_vocab,
    token_texts,
)
from opd.objectives.divergences import generalized_jsd
from opd.worlds.tokenizer import build_byte_bpe_tokenizer, build_char_tokenizer


def reference_value(s_logits, t_logits, pairs, beta, tau, w_m, w_u):
    """The hybrid at one position, token by token: plain Python over lists."""
    p = torch.softmax(s_logits / tau, -1)
    q = torch.softmax(t_logits / tau, -1)
    pm = [p[i] for i, _ in pairs]
    qm = [q[j] for _, j in pairs]
    zs, zt = sum(pm), sum(qm)
    pm = [x / zs for x in pm]
    qm = [x / zt for x in qm]
    mix = [beta * b + (1 - beta) * a for a, b in zip(pm, qm)]

    def kl(x, y):
        return sum(a * (torch.log(a) - torch.log(b)) for a, b in zip(x, y))

    matched = kl(qm, pm) if beta == 0 else kl(pm, qm) if beta == 1 else beta * kl(qm, mix) + (1 - beta) * kl(pm, mix)
    rest_s = sorted((p[i] for i in range(len(p)) if i not in {a for a, _ in pairs}), key=lambda x: -float(x.detach()))
    rest_t = sorted((q[j] for j in range(len(q)) if j not in {b for _, b in pairs}), key=lambda x: -float(x))
    width = max(len(rest_s), len(rest_t))
    rest_s += [torch.tensor(0.0, dtype=p.dtype)] * (width - len(rest_s))
    rest_t += [torch.tensor(0.0, dtype=q.dtype)] * (width - len(rest_t))
    unmatched = sum((a - b).abs() for a, b in zip(rest_s, rest_t))
    return w_m * matched + w_u * unmatched, matched, unmatched


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_hybrid_and_its_gradient_equal_the_token_by_token_formula(beta):
    torch.manual_seed(0)
    student_V, teacher_W = 6, 8
    pairs = [(0, 3), (2, 0), (5, 7)]  # student id -> teacher id writing the same text
    match = VocabularyMatch(torch.tensor([0, 2, 5]), torch.tensor([3, 0, 7]), torch.tensor([1, 3, 4]), torch.tensor([1, 2, 4, 5, 6]))
    s_logits = torch.randn(4, student_V, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(4, teacher_W, dtype=torch.float64)
    got = hybrid_divergence(s_logits, t_logits, None, match, beta, 0.9, 0.7, 1.3)
    got[:, 0].sum().backward()
    got_grad = s_logits.grad.clone()
    s_logits.grad = None
    expected = [reference_value(s_logits[n], t_logits[n], pairs, beta, 0.9, 0.7, 1.3) for n in range(4)]
    torch.testing.assert_close(got[:, 0].double(), torch.stack([e[0] for e in expected]).double().detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[:, 1].double(), torch.stack([e[1] for e in expected]).double().detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[:, 2].double(), torch.stack([e[2] for e in expected]).double().detach(), rtol=1e-5, atol=1e-7)
    sum(e[0] for e in expected).backward()
    torch.testing.assert_close(got_grad, s_logits.grad, rtol=1e-4, atol=1e-6)
    assert float(got[:, 2].detach().min()) > 0  # the leftovers differ: the sorted distance is not zero


def test_one_vocabulary_on_both_sides_gives_gkds_divergence():
    torch.manual_seed(1)
    V = 12
    everything = VocabularyMatch(torch.arange(V), torch.arange(V), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    s_logits, t_logits = torch.randn(5, V), torch.randn(5, V)
    for beta in (0.0, 0.3, 1.0):
        got = hybrid_divergence(s_logits, t_logits, None, everything, beta, 0.9)
        torch.testing.assert_close(got[:, 0], generalized_jsd(s_logits, t_logits, beta, 0.9), rtol=1e-5, atol=1e-6)
        assert float(got[:, 2].abs().max()) == 0.0


def test_streaming_in_chunks_gives_the_unchunked_values_and_gradient():
    torch.manual_seed(2)
    H, V, W = 8, 10, 7
    student_head, teacher_head = torch.randn(V, H), torch.randn(W, H)
    match = VocabularyMatch(torch.tensor([0, 1, 2, 3]), torch.tensor([6, 5, 4, 3]), torch.arange(4, V), torch.tensor([0, 1, 2]))
    hidden = torch.randn(9, H, requires_grad=True)
    teacher_hidden = torch.randn(9, H)

    def divergence(s, t, keys):
        return hybrid_divergence(s, t, keys, match, 0.5, 1.0)

    chunked = streamed_cross_vocab(hidden, teacher_hidden, lambda h: h @ student_head.T, lambda h: h @ teacher_head.T, divergence, chunk_size=4)
    chunked[:, 0].sum().backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    whole = divergence(hidden @ student_head.T, teacher_hidden @ teacher_head.T, None)
    whole[:, 0].sum().backward()
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad, hidden.grad)


def test_tokens_are_matched_by_the_text_they_write():
    student = build_char_tokenizer()
    teacher = build_byte_bpe_tokenizer(["7+9=16,4+8+1=13|936 hello world"] * 20, vocab_size=300)
    match = match_vocabularies(student, teacher, len(student) + 2, len(teacher))  # 2 padding rows past the student's tokenizer
    s_text, t_text = token_texts(student, len(student)), token_texts(teacher, len(teacher))
    pairs = dict(zip(match.student_M.tolist(), match.teacher_M.tolist()))
    assert all(s_text[i] == t_text[j] for i, j in pairs.items())
    space = student.convert_tokens_to_ids(" ")
    assert t_text[pairs[space]] == " " and teacher.convert_ids_to_tokens(pairs[space]) == "Ġ"  # byte-level writes a space as Ġ
    assert pairs[student.eos_token_id] == teacher.eos_token_id  # special tokens by their written form
    assert len(student) in match.student_rest_U.tolist() and len(student) + 1 in match.student_rest_U.tolist()
    merged = [j for j, text in enumerate(t_text) if text and len(text) > 1 and not text.startswith("<")]  # not the special tokens
    assert merged and all(j in match.teacher_rest_W.tolist() for j in merged)  # "16", "93"…: no single character writes them
    assert sorted(match.student_M.tolist() + match.student_rest_U.tolist()) == list(range(len(student) + 2))
    assert sorted(match.teacher_M.tolist() + match.teacher_rest_W.tolist()) == list(range(len(teacher)))
    assert math.isclose(len(pairs), len(set(pairs.values())))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_projection_and_its_gradient_equal_the_token_by_token_formula(beta):
    """D_β(P_T→S ‖ P_S) with P_T→S(i) the teacher's probability of its tokens that start with student token i,
    renormalised over the teacher tokens that map anywhere; a student token nothing maps to gets 1e-12 first."""
    torch.manual_seed(3)
    student_of = [0, 2, 2, -1, 1, 0, 2]  # teacher id -> student id (-1: a teacher token of no whole text)
    projection = VocabularyProjection(torch.tensor(student_of))
    s_logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)  # student id 3: no teacher token maps to it
    t_logits = torch.randn(3, 7, dtype=torch.float64)
    got = projected_divergence(s_logits, t_logits, None, projection, beta, 0.8)
    got[:, 0].sum().backward()
    got_grad, s_logits.grad = s_logits.grad.clone(), None
    total = 0.0
    for n in range(3):
        p = torch.softmax(s_logits[n] / 0.8, -1)
        t = torch.softmax(t_logits[n] / 0.8, -1)
        q = [sum(float(t[j]) for j, i in enumerate(student_of) if i == k) for k in range(4)]
        mass = sum(q)
        q = torch.tensor([max(x / mass, 1e-12) for x in q], dtype=torch.float64)
        q = q / q.sum()
        mix = beta * q + (1 - beta) * p
        kl = lambda a, b: (a * (a.log() - b.log())).sum()  # noqa: E731
        value = kl(q, p) if beta == 0 else kl(p, q) if beta == 1 else beta * kl(q, mix) + (1 - beta) * kl(p, mix)
        torch.testing.assert_close(got[n, 0].double(), value.detach(), rtol=1e-5, atol=1e-7)
        assert float(got[n, 1].detach()) == pytest.approx(mass, rel=1e-6)
        total = total + value
    total.backward()
    torch.testing.assert_close(got_grad, s_logits.grad, rtol=1e-4, atol=1e-6)


def test_one_vocabulary_projected_onto_itself_gives_gkds_divergence():
    torch.manual_seed(4)
    itself = VocabularyProjection(torch.arange(9))
    s_logits, t_logits = torch.randn(5, 9), torch.randn(5, 9)
    for beta in (0.0, 0.3, 1.0):
        torch.testing.assert_close(projected_divergence(s_logits, t_logits, None, itself, beta, 0.9)[:, 0],
                                   generalized_jsd(s_logits, t_logits, beta, 0.9), rtol=1e-5, atol=1e-6)


def test_each_teacher_token_maps_to_the_student_token_its_text_starts_with():
    student = build_char_tokenizer()
    teacher = build_byte_bpe_tokenizer(["7+9=16,4+8+1=13|936 hello world"] * 20, vocab_size=300, pieces=r"\d[^\d]*|[^\d]+")
    projection = project_vocabularies(student, teacher, len(student), len(teacher), ((student.eos_token_id, teacher.convert_tokens_to_ids("<|user|>")),))
    texts = token_texts(teacher, len(teacher))
    mapped = 0
    for j, i in enumerate(projection.student_of_W.tolist()):
        if texts[j] is None:
            assert i == -1  # a byte of no whole character
        elif j == teacher.convert_tokens_to_ids("<|user|>"):
            assert i == student.eos_token_id  # the role pair wins
        elif i == -1:  # a character the student cannot write (a control byte)
            assert student.convert_tokens_to_ids(texts[j][0]) == student.unk_token_id
        elif not texts[j].startswith("<"):
            assert student.convert_ids_to_tokens(i) == texts[j][0]  # a character student: the first character
            mapped += len(texts[j]) > 1
    assert mapped > 0 and projection.student_of_W[teacher.convert_tokens_to_ids("6,")] == student.convert_tokens_to_ids("6")


def test_inside_a_teacher_token_the_projection_reads_what_its_text_goes_on_with():
    """After the student has written "6" of the teacher's "6," (a student position inside a teacher token), the
    teacher tokens that start with "6" and go on past it map to the student token their rest starts with: "6," to ",",
    "6=" to "="; the token "6" itself (which no longer goes on) and tokens of other starts map nowhere."""
    student = build_char_tokenizer()
    teacher = build_byte_bpe_tokenizer(["7+9=16,4+8+1=13|936 6=6|"] * 20, vocab_size=300, pieces=r"\d[^\d]*|[^\d]+")
    projection = project_vocabularies(student, teacher, len(student), len(teacher))
    teacher_ids, student_ids = projection.within("6", "cpu")
    pairs = {teacher.convert_ids_to_tokens(j): student.convert_ids_to_tokens(i) for j, i in zip(teacher_ids.tolist(), student_ids.tolist())}
    assert pairs and pairs.get("6,") == "," and pairs.get("6=") == "=" and pairs.get("6|") == "|"
    assert "6" not in pairs and all(t.startswith("6") for t in pairs)
    s_logits, t_logits = torch.randn(2, len(student)), torch.randn(2, len(teacher))
    got = projected_divergence(s_logits, t_logits, torch.tensor([0, 1]), projection, 0.0, 1.0, ["", "6"])
    p_t = t_logits.softmax(-1)
    q = torch.zeros(len(student)).index_add_(0, student_ids, p_t[1, teacher_ids])
    q = (q / q.sum()).clamp(min=1e-12)
    q = q / q.sum()
    torch.testing.assert_close(got[1, 0], (q * (q.log() - s_logits[1].log_softmax(-1))).sum(), rtol=1e-4, atol=1e-6)  # forward KL


def test_a_special_token_of_the_teacher_maps_to_the_same_special_token_or_nowhere():
    """A teacher's special token is a role: "<|im_end|>", which the student lacks, is not read as the characters "<",
    "|"…; one the student has as a special token of the same written form maps to it; the pairs given win."""
    student = build_char_tokenizer()
    teacher = build_byte_bpe_tokenizer(["7+9=16,4+8+1=13|936"] * 20, vocab_size=300)
    teacher.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    im_end = teacher.convert_tokens_to_ids("<|im_end|>")
    projection = project_vocabularies(student, teacher, len(student), len(teacher))
    assert projection.student_of_W[im_end] == -1
    assert projection.student_of_W[teacher.convert_tokens_to_ids("<|user|>")] == student.convert_tokens_to_ids("<|user|>")
    paired = project_vocabularies(student, teacher, len(student), len(teacher), ((student.eos_token_id, im_end),))
    assert paired.student_of_W[im_end] == student.eos_token_id
    assert projection.within("<|im", "cpu")[0].numel() == 0  # a special token is never the rest of a prefix
