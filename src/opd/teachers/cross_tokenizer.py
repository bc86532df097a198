"""A teacher with a tokenizer of its own (``teacher.tokenizer: own``): it reads the student's completions as text.

For each row, the student's prompt messages are rendered by the teacher's own chat template, the completion's text
(the student's ids decoded) is split by the teacher's tokenizer (its EOS appended where the student's completion
ended with one), and the two tokenizations are aligned into spans whose boundaries both share
(``models.alignment``). The teacher scores its own tokens; a span's teacher log-prob is the sum over its tokens.

What the loss gets (``SpanScores``) keeps the student's ``[B, C]`` layout: each span's value sits on the span's
last student token, and ``spread`` hands a per-span result back to every student token of the span. With two
identical tokenizers every span is one token and everything here is the identity (docs/methods.md, "A teacher with
another tokenizer"). For GKD, ``aligned_distributions`` gives the teacher's next-token distributions beside the
student's: at every student token, from the teacher token it starts in (the projection), or at the spans of one
token on each side (the hybrid; ``objectives.cross_vocab``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..models.alignment import Spans, align, decoded_intervals, encoded_intervals
from ..episodes.driver import template_kwargs_with_tools, text_after_reply
from ..models.prompts import encode_prompt, prompt_ids, render_prompt
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
    key_BC: torch.Tensor | None = None  # each student token's index into ``prefixes`` (every_token)
    prefixes: list[str] = field(default_factory=lambda: [""])  # the teacher token's text the student has written already


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


@dataclass(frozen=True)
class RowSpans:
    """One row's spans, placed in its two completions: the student token at column ``student_cols[i]`` is in span
    ``student_span[i]``, the teacher token at column ``teacher_cols[j]`` in span ``teacher_span[j]``; spans are numbered
    0 .. count-1 in text order. Tokens in no column list (a tool episode's observations) are in no span."""

    student_cols: tuple[int, ...]
    student_span: tuple[int, ...]
    teacher_cols: tuple[int, ...]
    teacher_span: tuple[int, ...]
    count: int
    # for each student token: the teacher column whose next-token distribution predicts it, and the text of that
    # teacher token the student has written already ("" at a span's start); (-1, "") for none
    student_reads: tuple[tuple[int, str], ...] = ()

    @classmethod
    def of(cls, spans: Spans, student_start: int = 0, teacher_start: int = 0, first_span: int = 0,
           reads: list[tuple[int, str]] | None = None) -> "RowSpans":
        """``spans`` of two token lists that start at columns ``student_start`` / ``teacher_start``, numbered from
        ``first_span``; ``reads``: each student token's (teacher index in its list, prefix) (``spans_reads``)."""
        placed = tuple((teacher_start + u if u >= 0 else -1, prefix) for u, prefix in (reads or [(-1, "")] * len(spans.of_a)))
        return cls(tuple(range(student_start, student_start + len(spans.of_a))), tuple(first_span + i for i in spans.of_a),
                   tuple(range(teacher_start, teacher_start + len(spans.of_b))), tuple(first_span + i for i in spans.of_b), spans.count,
                   placed)

    def then(self, more: "RowSpans") -> "RowSpans":
        """These spans followed by ``more`` (placed and numbered after them already)."""
        return RowSpans(self.student_cols + more.student_cols, self.student_span + more.student_span,
                        self.teacher_cols + more.teacher_cols, self.teacher_span + more.teacher_span, self.count + more.count,
                        self.student_reads + more.student_reads)

    def first(self, room: int) -> "RowSpans":
        """The spans all of whose teacher tokens lie in the teacher's first ``room`` columns (a context it cannot run
        past), with both sides' tokens of them: a prefix of each, as spans follow the text."""
        kept = next((span for col, span in zip(self.teacher_cols, self.teacher_span) if col >= room), self.count)
        students = sum(span < kept for span in self.student_span)  # spans are in text order: both sides keep a prefix
        teachers = sum(span < kept for span in self.teacher_span)
        return RowSpans(self.student_cols[:students], self.student_span[:students], self.teacher_cols[:teachers],
                        self.teacher_span[:teachers], kept, self.student_reads[:students])

    def members(self, cols: tuple[int, ...], spans: tuple[int, ...]) -> list[list[int]]:
        """The columns of each span, for one side (``cols`` and ``spans`` of it)."""
        out: list[list[int]] = [[] for _ in range(self.count)]
        for col, span in zip(cols, spans):
            out[span].append(col)
        return out


def spans_reads(spans: Spans, text: str, student: list[tuple[int, int]], teacher: list[tuple[int, int]]) -> list[tuple[int, str]]:
    """For each student token (its character interval in ``text``), the teacher token of its span whose next-token
    distribution predicts it — the one whose characters it starts in — and the text of that teacher token before it:
    "" at a span's start, "6" for the "," of the teacher's "6,". A student token that starts no character of its own
    (the second byte of a character) reads none: (-1, "")."""
    if not spans.count:  # one side wrote nothing the other can be set beside
        return [(-1, "")] * len(student)
    members = spans.members("b")
    reads, last_start = [], None
    for a, (start, _) in enumerate(student):
        span_teacher = members[spans.of_a[a]]
        starts_span = a == 0 or spans.of_a[a - 1] != spans.of_a[a]
        if starts_span:
            reads.append((span_teacher[0], ""))
        elif start == last_start:  # shares its character with the token before it
            reads.append((-1, ""))
        else:
            covering = next((u for u in span_teacher if teacher[u][0] < start < teacher[u][1]), None)
            reads.append((covering, text[teacher[covering][0]:start]) if covering is not None else (-1, ""))
        last_start = start
    return reads


def trained_runs(trained: list[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of 1s: a tool episode's agent turns, between its observations."""
    runs, start = [], None
    for i, flag in enumerate(trained + [0]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


class CrossTokenizerTeacher(StatelessTeacher):
    """``teacher`` (a local model teacher, or a served one) scoring completions through its own tokenizer.

    ``messages(example)`` gives the chat turns the student's prompt was rendered from (the task's), and
    ``template_kwargs`` the chat template's arguments. Where the student's completion ended with its EOS, the
    teacher's copy ends with what the teacher's own template closes a reply with (``reply_end_ids``).

    ``context`` is the teacher's context in its own tokens (None: unknown, nothing is cut). A row whose copy would run
    past it keeps the spans that fit whole; the student tokens of the spans cut are in no span (no gradient, still
    counted in the loss's N); ``SpanScores.cut_tokens`` counts them (the step's ``teacher_context_cut_tokens``)."""

    reads_text = True

    def __init__(self, teacher: Teacher, student_tokenizer, teacher_tokenizer, messages: Callable[[Example], list[dict]],
                 template_kwargs: dict | None = None, student_eos: Sequence[int] = (), context: int | None = None):
        self.teacher, self.context = teacher, context
        # objectives.cross_vocab's VocabularyMatch (method.gkd.cross_vocab=hybrid) or VocabularyProjection
        # (projection), set where a full-vocabulary loss reads the teacher
        self.match = None
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.messages, self.template_kwargs = messages, template_kwargs
        self.student_eos = set(student_eos) or {student_tokenizer.eos_token_id}
        # empty in the text the teacher reads: the student's EOS (the teacher's own EOS ends its copy); any other special
        # token the student wrote is written out, for the teacher's tokenizer to read as it reads that text
        self.student_special = set(self.student_eos)
        self.teacher_pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else teacher_tokenizer.eos_token_id
        self.teacher_end = reply_end_ids(teacher_tokenizer, template_kwargs)

    def token_logprobs(self, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
        raise TypeError("a teacher with its own tokenizer scores spans (span_scores), not the student's tokens")

    def distributions(self, rollouts: Rollouts):
        raise TypeError("a teacher with its own tokenizer has no distribution over the student's vocabulary (aligned_distributions)")

    def _teacher_copy(self, rollouts: Rollouts, examples: Sequence[Example]) -> tuple[Rollouts, list[RowSpans], int]:
        """The rows as the teacher reads them (its prompts and its split of the completions' text), each row's spans,
        and the student tokens cut for the teacher's context (see the class's docstring)."""
        prompts, completions, alignments, cut = [], [], [], 0
        for b, example in enumerate(examples):
            n = int(rollouts.completion_mask_BC[b].sum())
            ids = rollouts.completion_ids_BC[b, :n].tolist()
            trained_C = rollouts.loss_mask_BC[b, :n].bool()
            if "episode" in example.meta:
                prompt, teacher_ids, spans = self._episode(ids, trained_C.tolist(), example.meta["episode"])
            elif int((trained_C[1:] & ~trained_C[:-1]).sum()) > 0:  # a second run of trained tokens: turns, but no episode
                raise ValueError("a row of several trained turns came without the episode it played (Episodes.played): "
                                 "a teacher of its own tokenizer cannot render it")
            else:
                prompt, teacher_ids, spans = self._reply(ids, example)
            if self.context is not None and len(prompt) + len(teacher_ids) > self.context:
                whole = len(spans.student_cols)
                spans = spans.first(self.context - len(prompt))
                teacher_ids, cut = teacher_ids[: max(0, self.context - len(prompt))], cut + whole - len(spans.student_cols)
                prompt = prompt[: self.context]  # a prompt the teacher cannot even read: nothing of the row is scored
            prompts.append(prompt)
            completions.append(teacher_ids)
            alignments.append(spans)
        return build_rollouts(prompts, completions, self.teacher_pad, device=rollouts.completion_ids_BC.device), alignments, cut

    def _turn(self, ids: list[int], student_start: int = 0, teacher_start: int = 0, first_span: int = 0) -> tuple[list[int], RowSpans]:
        """One reply of the student (its ids, from completion column ``student_start``) in the teacher's tokens (from
        column ``teacher_start``), and the two aligned (spans numbered from ``first_span``): the reply's text split
        by the teacher, closed as the teacher's template closes a reply where the student closed it with its EOS."""
        text, student_intervals = decoded_intervals(self.student_tokenizer, ids, self.student_special)
        teacher_ids, teacher_intervals = encoded_intervals(self.teacher_tokenizer, text)
        if ids and ids[-1] in self.student_eos:  # the student ended its reply: so does the teacher's copy of it
            teacher_ids += self.teacher_end
            teacher_intervals += [(len(text), len(text))] * len(self.teacher_end)
        spans = align(student_intervals, teacher_intervals)
        reads = spans_reads(spans, text, student_intervals, teacher_intervals)
        return teacher_ids, RowSpans.of(spans, student_start, teacher_start, first_span, reads)

    def _reply(self, ids: list[int], example: Example) -> tuple[list[int], list[int], RowSpans]:
        """A single-turn row: the task's prompt messages in the teacher's template, the completion as one reply."""
        prompt = encode_prompt(self.teacher_tokenizer, self.messages(example), None, self.template_kwargs)
        teacher_ids, spans = self._turn(ids)
        return prompt, teacher_ids, spans

    def _episode(self, ids: list[int], trained: list[int], episode: dict) -> tuple[list[int], list[int], RowSpans]:
        """A tool episode (``Episodes.played``), rendered turn by turn in the teacher's template: its first messages
        (and tools) as the prompt, then each agent reply in the teacher's tokens, aligned with the student's tokens of
        that turn (a run of trained tokens), followed by what the teacher's template puts after a reply (its closing,
        the tool results, the next generation prompt). Those are context, in no span, as the student's are."""
        messages, kwargs = episode["messages"], template_kwargs_with_tools(self.template_kwargs, episode["tools"])
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        first = replies[0] if replies else len(messages)
        prompt = prompt_ids(self.teacher_tokenizer, messages[:first], kwargs)
        runs = trained_runs(trained)
        if len(runs) != len(replies):  # a turn whose tokens cannot be told apart: the row is not scored
            return prompt, [], RowSpans.of(Spans((), (), 0))
        teacher_ids: list[int] = []
        spans = RowSpans.of(Spans((), (), 0))
        for turn, ((start, stop), at) in enumerate(zip(runs, replies)):
            turn_ids, turn_spans = self._turn(ids[start:stop], start, len(teacher_ids), spans.count)
            spans = spans.then(turn_spans)
            teacher_ids += turn_ids
            following = replies[turn + 1] if turn + 1 < len(replies) else len(messages)
            if following > at + 1 or turn + 1 < len(replies):  # tool results (and another turn) after this reply
                closed = self.teacher_tokenizer.decode(self.teacher_end, skip_special_tokens=False) if ids[stop - 1] in self.student_eos else ""
                between = text_after_reply(self.teacher_tokenizer, messages[:at], messages[at + 1:following], kwargs, closed, turn + 1)
                teacher_ids += self.teacher_tokenizer(between, add_special_tokens=False)["input_ids"]
        return prompt, teacher_ids, spans

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
            student_span, student_cols = torch.tensor(spans.student_span, device=device), torch.tensor(spans.student_cols, device=device)
            sums_S = torch.zeros(spans.count, dtype=teacher_logp_BT.dtype, device=device)
            sums_S.scatter_add_(0, torch.tensor(spans.teacher_span, device=device), teacher_logp_BT[b, list(spans.teacher_cols)])
            ends_S = torch.zeros(spans.count, dtype=torch.long, device=device).scatter_reduce(0, student_span, student_cols, "amax", include_self=False)
            end_BC[b, student_cols] = ends_S[student_span]
            last_BC[b, ends_S] = True
            span_logp_BC[b, ends_S] = sums_S
        return SpanScores(span_logp_BC, last_BC, end_BC, cut)

    def aligned_distributions(self, rollouts: Rollouts, examples: Sequence[Example], every_token: bool = False) -> AlignedDistributions:
        """The teacher's next-token distributions where they can be set beside the student's. ``every_token``: at
        each student token of a span, the distribution of the teacher token it starts in, with the text of that token
        the student has written already (``prefixes[key_BC]``: "" at a span's start, where both predict from the same
        text).
        Else only at the spans of one token on each side, where both also predict the same stretch of text."""
        B, C = rollouts.completion_ids_BC.shape
        teacher_rollouts, alignments, cut = self._teacher_copy(rollouts, examples)
        teacher = self.teacher.distributions(teacher_rollouts)
        column_BC = torch.full((B, C), -1, dtype=torch.long)
        key_BC = torch.zeros((B, C), dtype=torch.long)
        prefixes: dict[str, int] = {"": 0}
        for b, spans in enumerate(alignments):
            if every_token:
                read = [(c, u, prefixes.setdefault(prefix, len(prefixes))) for c, (u, prefix) in zip(spans.student_cols, spans.student_reads) if u >= 0]
            else:
                pairs = zip(spans.members(spans.student_cols, spans.student_span), spans.members(spans.teacher_cols, spans.teacher_span))
                read = [(cols[0], us[0], 0) for cols, us in pairs if len(cols) == len(us) == 1]
            if read:  # one write per row, not one per token
                cols, us, keys = (torch.tensor(values) for values in zip(*read))
                column_BC[b, cols], key_BC[b, cols] = us, keys
        device = rollouts.completion_ids_BC.device
        return AlignedDistributions(teacher.hidden_BCH, teacher.project, column_BC.to(device), cut, key_BC.to(device), list(prefixes))

    def after_optimizer_step(self, student: torch.nn.Module) -> None:
        self.teacher.after_optimizer_step(student)

    def take_failure(self) -> Exception | None:
        """A served teacher's failure since the last call (its rows were scored NaN: the step is given up)."""
        return self.teacher.take_failure()
