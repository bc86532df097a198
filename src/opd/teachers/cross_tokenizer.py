"""A teacher with a tokenizer of its own (``teacher.tokenizer: own``): it reads the student's completions as text.

For each row, the student's prompt messages are rendered by the teacher's own chat template, the completion's text
(the student's ids decoded) is split by the teacher's tokenizer (its EOS appended where the student's completion
ended with one), and the two tokenizations are aligned into spans whose boundaries both share
(``models.alignment``). The teacher scores its own tokens; a span's teacher log-prob is the sum over its tokens.

What the loss gets (``SpanScores``) keeps the student's ``[B, C]`` layout: each span's value sits on the span's
last student token, and ``spread`` hands a per-span result back to every student token of the span. With two
identical tokenizers every span is one token and everything here is the identity (docs/methods.md, "A teacher with
another tokenizer").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..models.alignment import Spans, align, decoded_intervals, encoded_intervals
from ..models.prompts import encode_prompt, render_prompt
from ..models.rollouts import Rollouts, build_rollouts
from ..tasks.base import Example
from .base import StatelessTeacher, Teacher


@dataclass(frozen=True)
class SpanScores:
    """The teacher's log-probs of a batch's completions, span by span, in the student's ``[B, C]`` layout.

    ``last_BC`` marks the last student token of each span; ``end_BC`` gives each student token the column of its
    span's last token (a token in no span — past the completion, or special tokens with no text where the teacher
    has nothing, or past the teacher's context — points at itself and is never a last token); ``teacher_logp_BC``
    holds each span's teacher log-prob on its last token and 0 elsewhere."""

    teacher_logp_BC: torch.Tensor
    last_BC: torch.Tensor
    end_BC: torch.Tensor
    cut_tokens: int = 0  # student tokens left in no span because the teacher's copy ran past its context

    def collapse(self, values_BC: torch.Tensor) -> torch.Tensor:
        """Each span's sum of ``values_BC`` over its student tokens, on its last token; 0 elsewhere."""
        return self._per_span(values_BC, 0.0, "sum")

    def span_max(self, values_BC: torch.Tensor) -> torch.Tensor:
        """Each span's largest value of ``values_BC`` over its student tokens, on its last token; 0 elsewhere."""
        return self._per_span(values_BC, torch.finfo(values_BC.dtype).min, "amax")

    def _per_span(self, values_BC: torch.Tensor, empty: float, reduce: str) -> torch.Tensor:
        columns_BC = torch.arange(values_BC.shape[1], device=values_BC.device).expand_as(self.end_BC)
        in_span_BC = (self.end_BC != columns_BC) | self.last_BC  # a token in no span points at itself, not a last token
        reduced_BC = torch.full_like(values_BC, empty).scatter_reduce(1, self.end_BC, torch.where(in_span_BC, values_BC, empty), reduce)
        return torch.where(self.last_BC, reduced_BC, 0.0)

    def spread(self, values_BC: torch.Tensor) -> torch.Tensor:
        """Each student token gets the value its span's last token holds."""
        return values_BC.gather(1, self.end_BC)

    def span_mask(self, mask_BC: torch.Tensor) -> torch.Tensor:
        """1 on the last token of each span all of whose student tokens the loss trains on, else 0."""
        return (self.last_BC & (self.collapse(1.0 - mask_BC) == 0)).to(mask_BC.dtype)


@dataclass(frozen=True)
class AlignedDistributions:
    """The teacher's next-token distributions beside the student's: ``hidden_BTH`` over the teacher's own copy of the
    completions, its output layer, and for each student token the teacher column that predicts the same text
    (``column_BC``; -1 where the token's span is not one token on each side, or is cut for the teacher's context)."""

    hidden_BTH: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor]
    column_BC: torch.Tensor
    cut_tokens: int = 0


def reply_end_ids(tokenizer, template_kwargs: dict | None = None) -> list[int]:
    """The tokens a chat template closes an assistant reply with, up to its first special token (Gemma's
    ``<end_of_turn>``, Qwen's ``<|im_end|>``, Llama 3's ``<|eot_id|>``: not always the tokenizer's EOS), read from a
    sample conversation rendered with and without the reply; the tokenizer's EOS where that shows none."""
    eos = [tokenizer.eos_token_id]
    conversation, reply = [{"role": "user", "content": "What is 2+2?"}], "4"
    try:
        prefix = render_prompt(tokenizer, conversation, template_kwargs)
        full = tokenizer.apply_chat_template(conversation + [{"role": "assistant", "content": reply}], tokenize=False, **(template_kwargs or {}))
    except Exception:  # noqa: BLE001 - a template that cannot render the sample: the EOS
        return eos
    if not full.startswith(prefix + reply):
        return eos
    ids = tokenizer(full[len(prefix) + len(reply):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, added in tokenizer.added_tokens_decoder.items() if added.special}
    ends = [n for n, token in enumerate(ids) if token in special]
    return ids[: ends[0] + 1] if ends else eos


def reads_text(teacher) -> bool:
    """Whether ``teacher`` reads the student's completions as text in a tokenizer of its own (``span_scores``): a
    ``CrossTokenizerTeacher``, or routes that all are."""
    return bool(getattr(teacher, "reads_text", False))


class CrossTokenizerTeacher(StatelessTeacher):
    """``teacher`` (a local model teacher) scoring completions through its own tokenizer.

    ``messages(example)`` gives the chat turns the student's prompt was rendered from (the task's), and
    ``template_kwargs`` the chat template's arguments. Where the student's completion ended with its EOS, the
    teacher's copy ends with what the teacher's own template closes a reply with (``reply_end_ids``).

    ``context`` is the teacher's context in its own tokens (None: unknown, nothing is cut). A row whose copy would run
    past it keeps the spans that fit whole; the student tokens of the spans cut are in no span (no gradient, still
    counted in the loss's N); ``SpanScores.cut_tokens`` counts them (the step's ``teacher_context_cut_tokens``)."""

    def __init__(self, teacher: Teacher, student_tokenizer, teacher_tokenizer, messages: Callable[[Example], list[dict]],
                 template_kwargs: dict | None = None, student_eos: Sequence[int] = (), context: int | None = None):
        self.teacher, self.context = teacher, context
        self.match = None  # objectives.cross_vocab.VocabularyMatch, set where a full-vocabulary loss reads the teacher
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.messages, self.template_kwargs = messages, template_kwargs
        self.student_eos = set(student_eos) or {student_tokenizer.eos_token_id}
        # empty in the text the teacher reads: the student's EOS (the teacher's own EOS ends its copy); any other special
        # token the student wrote is written out, for the teacher's tokenizer to read as it reads that text
        self.student_special = set(self.student_eos)
        self.teacher_pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else teacher_tokenizer.eos_token_id
        self.teacher_end = reply_end_ids(teacher_tokenizer, template_kwargs)

    reads_text = True

    def token_logprobs(self, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
        raise TypeError("a teacher with its own tokenizer scores spans (span_scores), not the student's tokens")

    def distributions(self, rollouts: Rollouts):
        raise TypeError("a teacher with its own tokenizer has no distribution over the student's vocabulary (aligned_distributions)")

    def _teacher_copy(self, rollouts: Rollouts, examples: Sequence[Example]) -> tuple[Rollouts, list[Spans], int]:
        """The rows as the teacher reads them (its prompts and its split of the completions' text), each row's spans,
        and the student tokens cut for the teacher's context (see the class's docstring)."""
        prompts, completions, alignments, cut = [], [], [], 0
        for b, example in enumerate(examples):
            ids = rollouts.completion_ids_BC[b][rollouts.completion_mask_BC[b].bool()].tolist()
            text, student_intervals = decoded_intervals(self.student_tokenizer, ids, self.student_special)
            teacher_ids, teacher_intervals = encoded_intervals(self.teacher_tokenizer, text)
            if ids and ids[-1] in self.student_eos:  # the student ended its reply: so does the teacher's copy of it
                teacher_ids += self.teacher_end
                teacher_intervals += [(len(text), len(text))] * len(self.teacher_end)
            prompt = encode_prompt(self.teacher_tokenizer, self.messages(example), None, self.template_kwargs)
            spans = align(student_intervals, teacher_intervals)
            if self.context is not None and len(prompt) + len(teacher_ids) > self.context:
                whole = len(spans.of_a)
                spans = spans.first(self.context - len(prompt))
                teacher_ids, cut = teacher_ids[: len(spans.of_b)], cut + whole - len(spans.of_a)
                prompt = prompt[: self.context]  # a prompt the teacher cannot even read: nothing of the row is scored
            prompts.append(prompt)
            completions.append(teacher_ids)
            alignments.append(spans)
        return build_rollouts(prompts, completions, self.teacher_pad, device=rollouts.completion_ids_BC.device), alignments, cut

    def span_scores(self, rollouts: Rollouts, examples: Sequence[Example], temperature: float = 1.0) -> SpanScores:
        """The rows' spans and the teacher's log-prob of each (``temperature``: the teacher's scoring temperature)."""
        B, C = rollouts.completion_ids_BC.shape
        teacher_rollouts, alignments, cut = self._teacher_copy(rollouts, examples)
        device = rollouts.completion_ids_BC.device
        teacher_logp_BT = self.teacher.token_logprobs(teacher_rollouts, temperature)
        span_logp_BC = torch.zeros(B, C, dtype=teacher_logp_BT.dtype, device=device)
        last_BC = torch.zeros(B, C, dtype=torch.bool, device=device)
        end_BC = torch.arange(C, device=device).repeat(B, 1)
        for b, spans in enumerate(alignments):
            if not spans.count:
                continue
            of_student = torch.tensor(spans.of_a, device=device)
            of_teacher = torch.tensor(spans.of_b, device=device)
            sums_S = torch.zeros(spans.count, dtype=teacher_logp_BT.dtype, device=device)
            sums_S.scatter_add_(0, of_teacher, teacher_logp_BT[b, : len(spans.of_b)])
            ends_S = torch.zeros(spans.count, dtype=torch.long, device=device).scatter_reduce(
                0, of_student, torch.arange(len(spans.of_a), device=device), "amax", include_self=False)
            end_BC[b, : len(spans.of_a)] = ends_S[of_student]
            last_BC[b, ends_S] = True
            span_logp_BC[b, ends_S] = sums_S
        return SpanScores(span_logp_BC, last_BC, end_BC, cut)

    def aligned_distributions(self, rollouts: Rollouts, examples: Sequence[Example]) -> AlignedDistributions:
        """The teacher's next-token distributions where they can be set beside the student's: at each span of one
        token on each side, both models predict their next token from the same text."""
        B, C = rollouts.completion_ids_BC.shape
        teacher_rollouts, alignments, cut = self._teacher_copy(rollouts, examples)
        teacher = self.teacher.distributions(teacher_rollouts)
        column_BC = torch.full((B, C), -1, dtype=torch.long)
        for b, spans in enumerate(alignments):
            student_members, teacher_members = spans.members("a"), spans.members("b")
            for student_tokens, teacher_tokens in zip(student_members, teacher_members):
                if len(student_tokens) == len(teacher_tokens) == 1:
                    column_BC[b, student_tokens[0]] = teacher_tokens[0]
        return AlignedDistributions(teacher.hidden_BCH, teacher.project, column_BC.to(rollouts.completion_ids_BC.device), cut)

    def after_optimizer_step(self, student: torch.nn.Module) -> None:
        self.teacher.after_optimizer_step(student)

    def take_failure(self) -> Exception | None:
        """A served teacher's failure since the last call (its rows were scored NaN: the step is given up)."""
        return self.teacher.take_failure()
