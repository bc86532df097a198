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

from ..models.alignment import align, decoded_intervals, encoded_intervals
from ..models.prompts import encode_prompt, render_prompt
from ..models.rollouts import Rollouts, build_rollouts
from ..tasks.base import Example
from .base import StatelessTeacher, Teacher


@dataclass(frozen=True)
class SpanScores:
    """The teacher's log-probs of a batch's completions, span by span, in the student's ``[B, C]`` layout.

    ``last_BC`` marks the last student token of each span; ``end_BC`` gives each student token the column of its
    span's last token (a token in no span — past the completion, or special tokens with no text where the teacher
    has nothing — points at itself and is never a last token); ``teacher_logp_BC`` holds each span's teacher log-prob
    on its last token and 0 elsewhere."""

    teacher_logp_BC: torch.Tensor
    last_BC: torch.Tensor
    end_BC: torch.Tensor

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


class CrossTokenizerTeacher(StatelessTeacher):
    """``teacher`` (a local model teacher) scoring completions through its own tokenizer.

    ``messages(example)`` gives the chat turns the student's prompt was rendered from (the task's), and
    ``template_kwargs`` the chat template's arguments. Where the student's completion ended with its EOS, the
    teacher's copy ends with what the teacher's own template closes a reply with (``reply_end_ids``)."""

    def __init__(self, teacher: Teacher, student_tokenizer, teacher_tokenizer, messages: Callable[[Example], list[dict]],
                 template_kwargs: dict | None = None, student_eos: Sequence[int] = ()):
        self.teacher = teacher
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
        raise TypeError("a teacher with its own tokenizer has no distribution over the student's vocabulary")

    def span_scores(self, rollouts: Rollouts, examples: Sequence[Example], temperature: float = 1.0) -> SpanScores:
        """The rows' spans and the teacher's log-prob of each (``temperature``: the teacher's scoring temperature)."""
        B, C = rollouts.completion_ids_BC.shape
        prompts, completions, alignments = [], [], []
        for b, example in enumerate(examples):
            ids = rollouts.completion_ids_BC[b][rollouts.completion_mask_BC[b].bool()].tolist()
            text, student_intervals = decoded_intervals(self.student_tokenizer, ids, self.student_special)
            teacher_ids, teacher_intervals = encoded_intervals(self.teacher_tokenizer, text)
            if ids and ids[-1] in self.student_eos:  # the student ended its reply: so does the teacher's copy of it
                teacher_ids += self.teacher_end
                teacher_intervals += [(len(text), len(text))] * len(self.teacher_end)
            prompts.append(encode_prompt(self.teacher_tokenizer, self.messages(example), None, self.template_kwargs))
            completions.append(teacher_ids)
            alignments.append(align(student_intervals, teacher_intervals))
        device = rollouts.completion_ids_BC.device
        teacher_rollouts = build_rollouts(prompts, completions, self.teacher_pad, device=device)
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
        return SpanScores(span_logp_BC, last_BC, end_BC)

    def after_optimizer_step(self, student: torch.nn.Module) -> None:
        self.teacher.after_optimizer_step(student)
