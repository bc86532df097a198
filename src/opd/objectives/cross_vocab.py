"""Full-vocabulary divergences between two models whose vocabularies differ (``method.gkd.cross_vocab``), at positions
where both predict their next token from the same text. docs/methods.md, "A teacher with another tokenizer", states
where each applies and what it costs.

``projection`` maps the teacher's distribution onto the student's vocabulary: each teacher token j goes to the
student token s(j) its text starts with (``project_vocabularies``), and

    P_T→S(i) = Σ_{j : s(j) = i} P_T(j) / Σ_{j : s(j) exists} P_T(j),     D(n) = D_β(P_T→S ‖ P_S)

with D_β GKD's generalised JSD (arXiv 2306.13649; β = 0 forward KL, β = 1 reverse KL), both sides at temperature τ.

``hybrid`` is GOLD's exact matching for the tokens both vocabularies hold with ULD's sorted-probability distance
(Boizard et al. 2024, arXiv 2402.12030) for the rest:

    M        the pairs (i, j) of a student token i and a teacher token j that write the same text
    P̃_S, P̃_T  P_S on M's student ids and P_T on M's teacher ids, each renormalised over M
    D(n)     = w_m · D_β(P̃_T ‖ P̃_S) + w_u · Σ_k |sort↓(P_S on U_S)_k − sort↓(P_T on U_T)_k|

with U_S and U_T each side's tokens outside M and the shorter sorted vector padded with zeros (ULD's Wasserstein-1
distance between sorted distributions). With one vocabulary read on both sides, the projection is the identity, M
holds every token and U is empty: both are GKD's D_β.

Streamed like ``divergences.streamed_divergence``: both sides' logits exist for ``chunk_size`` positions at a time,
and each chunk is recomputed in the backward pass (no ``[N, V_S + V_T]`` tensor).
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .divergences import generalized_jsd

REPLACEMENT = "\ufffd"  # what a token that is only part of a UTF-8 character decodes to
UNMAPPED_LOGP = math.log(1e-12)  # the projection's log-prob of a student token no teacher token starts with


@dataclass(frozen=True)
class VocabularyMatch:
    """Which student ids and teacher ids write the same text (``student_M[k]`` ↔ ``teacher_M[k]``), and each side's
    other output ids."""

    student_M: torch.Tensor
    teacher_M: torch.Tensor
    student_rest_U: torch.Tensor
    teacher_rest_W: torch.Tensor

    def to(self, device) -> "VocabularyMatch":
        return VocabularyMatch(*(t.to(device) for t in (self.student_M, self.teacher_M, self.student_rest_U, self.teacher_rest_W)))


def token_texts(tokenizer, size: int) -> list[str | None]:
    """The text each of ids ``0 .. size-1`` writes in the middle of a text, or None where it writes no whole text of
    its own (part of a UTF-8 character, an id past the tokenizer, nothing at all). Special tokens are their written
    form. Each id is decoded after an anchor token, so that a SentencePiece piece keeps its leading space."""
    anchor_text = "a"
    anchor = tokenizer.convert_tokens_to_ids(anchor_text)
    if anchor is None or anchor == tokenizer.unk_token_id or tokenizer.decode([anchor]) != anchor_text:
        anchor = tokenizer(anchor_text, add_special_tokens=False)["input_ids"][-1]
        anchor_text = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
    ids = list(range(min(size, len(tokenizer))))
    decoded = tokenizer.batch_decode([[anchor, i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    texts: list[str | None] = []
    for text in decoded:
        piece = text[len(anchor_text):] if text.startswith(anchor_text) else None
        texts.append(piece if piece and REPLACEMENT not in piece else None)
    return texts + [None] * (size - len(ids))


def match_vocabularies(student_tok, teacher_tok, student_size: int, teacher_size: int,
                       extra_pairs: tuple[tuple[int, int], ...] = ()) -> VocabularyMatch:
    """``VocabularyMatch`` of two tokenizers with ``student_size`` / ``teacher_size`` output rows: ids that write the
    same text are paired (the lowest id where a side writes one text with several), and ``extra_pairs`` (student id,
    teacher id) pair tokens of the same role — the student's EOS and the token the teacher's template closes a reply
    with — before any text is (a role wins over a written form the two may share)."""
    teacher_by_text: dict[str, int] = {}
    for j, text in enumerate(token_texts(teacher_tok, teacher_size)):
        if text is not None:
            teacher_by_text.setdefault(text, j)
    pairs = {i: j for i, j in extra_pairs if i < student_size and j < teacher_size}
    taken: set[int] = set(pairs.values())
    for i, text in enumerate(token_texts(student_tok, student_size)):
        j = teacher_by_text.get(text) if text is not None else None
        if j is not None and j not in taken and i not in pairs:
            pairs[i] = j
            taken.add(j)
    student_M = sorted(pairs)
    return VocabularyMatch(
        torch.tensor(student_M, dtype=torch.long), torch.tensor([pairs[i] for i in student_M], dtype=torch.long),
        torch.tensor([i for i in range(student_size) if i not in pairs], dtype=torch.long),
        torch.tensor([j for j in range(teacher_size) if j not in taken], dtype=torch.long),
    )


class VocabularyProjection:
    """How the teacher's next-token distribution maps onto the student's vocabulary: for a teacher token whose text
    starts with ``prefix`` (the part of it the student has written already; "" at a span's start), the student token
    the rest of its text starts with. ``base`` (``student_of_W``) is the map for "": each teacher id's student id, -1
    for one that writes no whole text or a text the student cannot write; ``pairs`` (student id, teacher id) map
    tokens of the same role (the teacher's reply end to the student's EOS) and win over the text."""

    ANCHOR = "a"

    MAPS_KEPT = 65536  # prefix maps cached (each holds only the teacher tokens that go on past its prefix)

    def __init__(self, student_of_W: torch.Tensor, texts: list[str | None] | None = None, student_tok=None, student_size: int | None = None):
        self.student_of_W, self.student_tok = student_of_W, student_tok
        self.student_size = student_size if student_size is not None else int(student_of_W.max()) + 1
        # the teacher's texts sorted, so that the tokens a prefix starts are one range (bisect), not a vocabulary scan
        ordered = sorted((t, j) for j, t in enumerate(texts or []) if t is not None)
        self._sorted_texts, self._sorted_ids = [t for t, _ in ordered], [j for _, j in ordered]
        self._maps: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def to(self, device) -> "VocabularyProjection":
        return self  # the maps are made on the device that asks for them (``within``)

    def within(self, prefix: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(teacher_ids_K, student_ids_K)``: the teacher tokens whose text starts with ``prefix`` and goes on past
        it, and the student token the rest of each starts with (cached)."""
        key = (prefix, str(device))
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        if not prefix:
            teacher_ids = (self.student_of_W >= 0).nonzero().squeeze(-1)
            student_ids = self.student_of_W[teacher_ids]
        else:
            lo = bisect.bisect_right(self._sorted_texts, prefix)  # past the text equal to the prefix: only those that go on
            hi = bisect.bisect_left(self._sorted_texts, prefix + "\U0010ffff", lo)
            rests = [(j, t[len(prefix):]) for t, j in zip(self._sorted_texts[lo:hi], self._sorted_ids[lo:hi]) if t.startswith(prefix)]
            firsts = first_student_tokens(self.student_tok, [rest for _, rest in rests])
            kept = [(j, i) for (j, _), i in zip(rests, firsts) if 0 <= i < self.student_size]
            teacher_ids = torch.tensor([j for j, _ in kept], dtype=torch.long)
            student_ids = torch.tensor([i for _, i in kept], dtype=torch.long)
        self._maps[key] = (teacher_ids.to(device), student_ids.to(device))
        if len(self._maps) > self.MAPS_KEPT:
            self._maps.popitem(last=False)
        return self._maps[key]


def first_student_tokens(student_tok, texts: list[str | None]) -> list[int]:
    """The student token each text starts with, split behind an anchor character (as in the middle of a text); -1 for
    None, for nothing, and for a text the student can only write as its unknown token."""
    anchor = VocabularyProjection.ANCHOR
    anchor_ids = student_tok(anchor, add_special_tokens=False)["input_ids"]
    split = student_tok([anchor + (t or "") for t in texts], add_special_tokens=False)["input_ids"] if texts else []
    firsts = []
    for text, ids in zip(texts, split):
        if text is None:
            firsts.append(-1)
        elif ids[: len(anchor_ids)] == anchor_ids and len(ids) > len(anchor_ids):
            firsts.append(ids[len(anchor_ids)])
        else:  # the anchor merged with the text's start: the text alone
            alone = student_tok(text, add_special_tokens=False)["input_ids"]
            firsts.append(alone[0] if alone else -1)
    unknown = student_tok.unk_token_id  # a text the student cannot write maps nowhere, not to its unknown token
    return [-1 if i == unknown and text != student_tok.unk_token else i for i, text in zip(firsts, texts)]


def project_vocabularies(student_tok, teacher_tok, student_size: int, teacher_size: int,
                         extra_pairs: tuple[tuple[int, int], ...] = ()) -> VocabularyProjection:
    """``VocabularyProjection`` of two tokenizers: each teacher token's text (``token_texts``) is split by the
    student's tokenizer behind an anchor character (so that it is split as in the middle of a text), and its first
    token is the student token it maps to (none where that is the student's unknown token); ``extra_pairs`` (student
    id, teacher id) map tokens of the same role (the teacher's reply end to the student's EOS) and win over the
    split."""
    texts = token_texts(teacher_tok, teacher_size)
    student_of = first_student_tokens(student_tok, texts)
    # a special token of the teacher is a role, not text: it maps to the student's special token of the same
    # written form (one tokenizer read both ways) or nowhere, never to the characters its name is written with
    student_specials = special_tokens(student_tok)
    teacher_specials = [j for j in special_tokens(teacher_tok).values() if j < teacher_size]
    for j in teacher_specials:
        student_of[j] = student_specials.get(texts[j], -1) if texts[j] is not None else -1
    for i, j in extra_pairs:
        if j < teacher_size:
            student_of[j] = i
    student_of_W = torch.tensor(student_of, dtype=torch.long)
    rest_texts = list(texts)  # what may follow a prefix inside a teacher token: text, not a special token
    for j in teacher_specials:
        rest_texts[j] = None
    return VocabularyProjection(torch.where(student_of_W < student_size, student_of_W, -1), rest_texts, student_tok, student_size)


def special_tokens(tokenizer) -> dict[str, int]:
    """``{written form: id}`` of a tokenizer's special tokens (its named ones and the added tokens marked special)."""
    specials = {tokenizer.convert_ids_to_tokens(i): i for i in tokenizer.all_special_ids}
    specials.update({added.content: i for i, added in tokenizer.added_tokens_decoder.items() if added.special})
    return specials


def projected_divergence(student_logits_NV: torch.Tensor, teacher_logits_NW: torch.Tensor, keys_N: torch.Tensor | None,
                         projection: VocabularyProjection, beta: float, temperature: float, prefixes: list[str] = ("",)) -> torch.Tensor:
    """``[N, 3]``: D_β(P_T→S ‖ P_S) at each position (then the mass of P_T that maps to a student token, and 0), where
    ``P_T→S(i) = Σ_{j: s(j) = i} P_T(j)``, renormalised over the teacher tokens that map anywhere: the teacher's
    probability that the student's next token is ``i``, read as the probability that the teacher's next token (the
    rest of it past ``prefixes[keys_N[n]]``, what the student has written of it already) starts with it
    (docs/methods.md, "A teacher with another tokenizer"). ``keys_N`` None: every position at a span's start.
    Gradients flow into the student."""
    logp_s_NV = (student_logits_NV.float() / temperature).log_softmax(-1)
    p_t_NW = (teacher_logits_NW.float() / temperature).softmax(-1)
    q_NV = torch.zeros_like(logp_s_NV)
    keys_N = torch.zeros(len(q_NV), dtype=torch.long, device=q_NV.device) if keys_N is None else keys_N
    for key in keys_N.unique().tolist():
        rows = (keys_N == key).nonzero().squeeze(-1)
        teacher_ids, student_ids = projection.within(prefixes[key], q_NV.device)
        q_NV[rows] = torch.zeros_like(q_NV[rows]).index_add_(1, student_ids, p_t_NW[rows][:, teacher_ids])
    mass_N = q_NV.sum(-1)
    # a student token no teacher token starts with gets 1e-12 (then renormalised): a reverse KL stays finite
    log_q_NV = (q_NV / mass_N.clamp(min=torch.finfo(q_NV.dtype).tiny)[:, None]).log().clamp(min=UNMAPPED_LOGP)
    values_N = generalized_jsd(logp_s_NV, log_q_NV, beta, 1.0)
    # where none of the teacher's probability maps anywhere there is no target (not a uniform one): no loss there
    values_N = torch.where(mass_N > 0, values_N, torch.zeros_like(values_N))
    return torch.stack([values_N, mass_N, torch.zeros_like(values_N)], -1)


def hybrid_divergence(student_logits_NV: torch.Tensor, teacher_logits_NW: torch.Tensor, keys_N: torch.Tensor | None, match: VocabularyMatch,
                      beta: float, temperature: float, matched_weight: float = 1.0, unmatched_weight: float = 1.0) -> torch.Tensor:
    """``[N, 3]``: D(n) of the module's docstring, its matched term D_β(P̃_T ‖ P̃_S) and its unmatched term (the
    sorted distance), at each position (``keys_N``: unused, positions are spans of one token on each side);
    gradients flow into the student's logits."""
    logp_s_NV = (student_logits_NV.float() / temperature).log_softmax(-1)
    logp_t_NW = (teacher_logits_NW.float() / temperature).log_softmax(-1)
    if match.student_M.numel():  # renormalised over M by the divergence's own log-softmax
        matched_N = generalized_jsd(logp_s_NV[:, match.student_M], logp_t_NW[:, match.teacher_M], beta, 1.0)
    else:
        matched_N = logp_s_NV.new_zeros(logp_s_NV.shape[0])
    rest_s_NU = logp_s_NV[:, match.student_rest_U].exp().sort(-1, descending=True).values
    rest_t_NW = logp_t_NW[:, match.teacher_rest_W].exp().sort(-1, descending=True).values
    width = max(rest_s_NU.shape[1], rest_t_NW.shape[1])
    rest_s_NU = torch.nn.functional.pad(rest_s_NU, (0, width - rest_s_NU.shape[1]))
    rest_t_NW = torch.nn.functional.pad(rest_t_NW, (0, width - rest_t_NW.shape[1]))
    unmatched_N = (rest_s_NU - rest_t_NW).abs().sum(-1)
    return torch.stack([matched_weight * matched_N + unmatched_weight * unmatched_N, matched_N, unmatched_N], -1)


def _chunk(student_hidden, teacher_hidden, keys, student_project, teacher_project, divergence):
    with torch.no_grad():
        teacher_logits = teacher_project(teacher_hidden)
    return divergence(student_project(student_hidden), teacher_logits, keys)


def streamed_cross_vocab(
    student_hidden_NH: torch.Tensor, teacher_hidden_NH: torch.Tensor,
    student_project: Callable[[torch.Tensor], torch.Tensor], teacher_project: Callable[[torch.Tensor], torch.Tensor],
    divergence: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor], chunk_size: int = 1024,
    keys_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """``divergence(student_logits, teacher_logits, keys)`` (``[n, 3]`` per chunk; ``keys``: that chunk's ``keys_N``,
    or None) for every position, ``chunk_size`` rows at a time, each chunk checkpointed where gradients are wanted."""
    out = []
    for start in range(0, student_hidden_NH.shape[0], chunk_size):
        keys = keys_N[start:start + chunk_size] if keys_N is not None else None
        args = (student_hidden_NH[start:start + chunk_size], teacher_hidden_NH[start:start + chunk_size].detach(), keys,
                student_project, teacher_project, divergence)
        if torch.is_grad_enabled() and student_hidden_NH.requires_grad:
            out.append(checkpoint(_chunk, *args, use_reentrant=False))
        else:
            out.append(_chunk(*args))
    return torch.cat(out) if out else student_hidden_NH.new_zeros(0, 3, dtype=torch.float32)
