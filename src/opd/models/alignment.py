"""Two tokenizations of one text, aligned into spans whose boundaries both share: the ground on which a teacher with
a tokenizer of its own can score a student's completion (cross-tokenizer distillation, docs/methods.md).

Each token is a character interval ``(start, end)`` of the text. Tokens that only together make whole characters
(a byte-level BPE splitting a multi-byte UTF-8 character) share one interval, the characters they make; a token that
makes no text (an EOS, a special token decoded away) is empty, ``start == end``.

``align`` walks both lists at once. A span takes one token from each side, then the next token of whichever side
ends earlier, until both sides end at the same character and no next token overlaps what the span holds. So

- two identical tokenizations give one span per token (the cross-tokenizer losses then equal the shared-tokenizer
  ones exactly);
- ``"hello"`` as ``he|llo`` against ``h|ell|o`` is one span of 2 and 3 tokens;
- an EOS on both sides, after the text, is a span of its own; an empty token on one side only joins a span;
- where one side runs out first (the two never share a boundary again), the other side's remaining tokens join the
  last span.

Pure: no torch, no model; tokenizers are only read through ``decode`` and an offsets mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

Interval = tuple[int, int]

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to
DECODE_WINDOW = 8  # tokens of left context each token is decoded with (a SentencePiece piece's leading space)


@dataclass(frozen=True)
class Spans:
    """Each token's span on both sides: ``of_a[i]`` is the span of token ``i`` of tokenization A; spans are numbered
    0 .. count-1 in text order and every span holds at least one token of each side."""

    of_a: tuple[int, ...]
    of_b: tuple[int, ...]
    count: int

    def members(self, side: str) -> list[list[int]]:
        """The token indices of each span on one side (``"a"`` or ``"b"``)."""
        out: list[list[int]] = [[] for _ in range(self.count)]
        for index, span in enumerate(self.of_a if side == "a" else self.of_b):
            out[span].append(index)
        return out


def align(a: list[Interval], b: list[Interval]) -> Spans:
    """Spans of two tokenizations of one text (see the module's docstring); an empty side gives no spans."""
    if not a or not b:
        return Spans((0,) * len(a) if b else (), (0,) * len(b) if a else (), 1 if a and b else 0)
    of_a, of_b = [0] * len(a), [0] * len(b)
    i = j = count = 0
    while i < len(a) and j < len(b):
        a_end, b_end = a[i][1], b[j][1]
        of_a[i] = of_b[j] = count
        i, j = i + 1, j + 1
        while True:
            if i < len(a) and (a_end < b_end or a[i][0] < a_end):  # A ends earlier, or its next token overlaps the span
                a_end = max(a_end, a[i][1])
                of_a[i], i = count, i + 1
            elif j < len(b) and (b_end < a_end or b[j][0] < b_end):
                b_end = max(b_end, b[j][1])
                of_b[j], j = count, j + 1
            else:
                break
        count += 1
    for rest, of in ((range(i, len(a)), of_a), (range(j, len(b)), of_b)):  # one side ran out: the last span takes the rest
        for index in rest:
            of[index] = count - 1
    return Spans(tuple(of_a), tuple(of_b), count)


def decoded_intervals(tokenizer, ids: list[int], special: set[int] | None = None) -> tuple[str, list[Interval]]:
    """``(text, intervals)`` of token ids a model produced (not necessarily how its tokenizer would split the text):
    the text is the ids but those in ``special`` decoded (other special tokens written out, as a tokenizer that knows
    them reads them back), and each token's interval the characters it adds.

    Where the tokens decoded one by one add up to the text (character and byte-level BPE tokenizers on whole
    characters), that is the answer, in one call. Otherwise each token is decoded behind ``DECODE_WINDOW`` tokens of
    context (so that a SentencePiece piece keeps its leading space and the work stays linear in the length). Tokens
    whose text ends in an incomplete UTF-8 sequence wait for the tokens that complete it and then share their
    interval. Ids in ``special`` (default: the tokenizer's special ids) are empty. If the pieces do not add up to the
    whole decoded text (a tokenizer whose decoding of a piece depends on more than the window), every prefix is
    decoded instead: exact, quadratic."""
    special = set(tokenizer.all_special_ids) if special is None else special
    text = _decode(tokenizer, ids, special)
    pieces = tokenizer.batch_decode([[t] for t in ids if t not in special], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if "".join(pieces) == text and not any(REPLACEMENT in p for p in pieces):  # each token's text is its own: one call
        intervals, pos, it = [], 0, iter(pieces)
        for token in ids:
            end = pos if token in special else pos + len(next(it))
            intervals.append((pos, end))
            pos = end
        return text, intervals
    windowed = _windowed(tokenizer, ids, special)
    if windowed is not None and windowed[0] == text:
        return text, windowed[1]
    return text, _by_prefix(tokenizer, ids, special)


def _decode(tokenizer, ids: list[int], special: set[int]) -> str:
    """The ids' text as written: no special token but ``special`` dropped, and no clean-up of spaces (some tokenizers'
    default would turn the student's "f(a , b) ." into text it never wrote)."""
    return tokenizer.decode([t for t in ids if t not in special], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _waits(ids: list[int], k: int, text: str, special: set[int]) -> bool:
    """Whether token ``k``, whose text so far ends in an incomplete character, waits for the next token to complete
    it (not at the end, and not before a special token, which completes nothing)."""
    return text.endswith(REPLACEMENT) and k + 1 < len(ids) and ids[k + 1] not in special


def _windowed(tokenizer, ids: list[int], special: set[int]) -> tuple[str, list[Interval]] | None:
    """``(the pieces joined, intervals)``, or None where a piece's decoding is not an extension of its context's.

    A run of tokens that only together make whole characters is decoded from where it began, behind the
    ``DECODE_WINDOW`` tokens before it (a run may end in the middle of the next character: its tokens then share the
    characters up to where the run could close)."""
    intervals: list[Interval] = []
    pieces: list[str] = []
    run: list[int] = []  # indices into ``intervals`` of the tokens waiting for the rest of a character
    run_start = 0  # the index into ``ids`` where the current run (or token) began
    pos = 0
    for k, token in enumerate(ids):
        if token in special:
            intervals.append((pos, pos))
            continue
        if not run:
            run_start = k
        window = max(0, run_start - DECODE_WINDOW)
        before = _decode(tokenizer, ids[window:run_start], special)
        after = _decode(tokenizer, ids[window:k + 1], special)
        if not after.startswith(before):
            return None
        if _waits(ids, k, after, special):
            run.append(len(intervals))
            intervals.append((pos, pos))
            continue
        piece = after[len(before):]
        end = pos + len(piece)
        for index in run:
            intervals[index] = (pos, end)
        run.clear()
        intervals.append((pos, end))
        pieces.append(piece)
        pos = end
    return "".join(pieces), intervals


def _by_prefix(tokenizer, ids: list[int], special: set[int]) -> list[Interval]:
    intervals: list[Interval] = []
    run: list[int] = []
    pos = 0
    for k, token in enumerate(ids):
        if token in special:
            intervals.append((pos, pos))
            continue
        prefix = _decode(tokenizer, ids[:k + 1], special)
        if _waits(ids, k, prefix, special):
            run.append(len(intervals))
            intervals.append((pos, pos))
            continue
        end = max(pos, len(prefix))
        for index in run:
            intervals[index] = (pos, end)
        run.clear()
        intervals.append((pos, end))
        pos = end
    return intervals


def encoded_intervals(tokenizer, text: str) -> tuple[list[int], list[Interval]]:
    """``(ids, intervals)``: how ``tokenizer`` itself splits ``text`` (no special tokens added), each token's interval
    from the fast tokenizer's offsets mapping (which gives the bytes of one character that interval each). A token
    with no characters (a special token written in the text) is empty, where the text has got to."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    intervals: list[Interval] = []
    pos = 0
    for start, end in encoded["offset_mapping"]:
        intervals.append((start, end) if end > start else (pos, pos))
        pos = max(pos, end)
    return list(encoded["input_ids"]), intervals
