"""Aligning two tokenizations of one text (models/alignment.py): hand-made tokenizations whose spans are known, and
real tokenizers — the embedded world's character tokenizer against a byte-level BPE trained here — on ASCII, on
multi-byte characters the BPE splits into bytes, and on ids no tokenizer would produce from the text."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from opd.models.alignment import align, decoded_intervals, encoded_intervals

CHAR_TOKENIZER = Path(__file__).resolve().parents[2] / "src" / "opd" / "assets" / "world" / "tokenizer"


@functools.cache
def char_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(CHAR_TOKENIZER)


@functools.cache
def byte_bpe():
    """A byte-level BPE (GPT-2's scheme) trained on a few lines: multi-character ASCII tokens, and every non-ASCII
    character it has not merged split into its UTF-8 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world 12+30=42 café", "the answer is 42"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def spans_of(intervals_a, intervals_b):
    spans = align(intervals_a, intervals_b)
    return spans.members("a"), spans.members("b")


def test_identical_tokenizations_give_one_span_per_token():
    tokens = [(0, 2), (2, 3), (3, 7), (7, 7)]  # the last: an EOS
    spans = align(tokens, tokens)
    assert spans.of_a == spans.of_b == (0, 1, 2, 3) and spans.count == 4


def test_a_span_closes_where_both_sides_end_at_one_character():
    # "hello world": he|llo| world  against  h|ell|o| w|orld
    a = [(0, 2), (2, 5), (5, 11)]
    b = [(0, 1), (1, 4), (4, 5), (5, 7), (7, 11)]
    assert spans_of(a, b) == ([[0, 1], [2]], [[0, 1, 2], [3, 4]])


def test_the_bytes_of_one_character_stay_in_one_span():
    # "aé€b": A has "aé" and "€b" as tokens; B has "a", then é's two bytes, then €'s three bytes, then "b"
    a = [(0, 2), (2, 4)]
    b = [(0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (2, 3), (3, 4)]
    assert spans_of(a, b) == ([[0], [1]], [[0, 1, 2], [3, 4, 5, 6]])
    # the same bytes against one token per character: é's bytes match é, €'s match €
    chars = [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert spans_of(chars, b) == ([[0], [1], [2], [3]], [[0], [1, 2], [3, 4, 5], [6]])


def test_an_eos_on_both_sides_is_its_own_span_and_on_one_side_joins_the_last():
    a = [(0, 3), (3, 5), (5, 5)]
    assert spans_of(a, [(0, 3), (3, 5), (5, 5)])[1] == [[0], [1], [2]]
    assert spans_of(a, [(0, 3), (3, 5)]) == ([[0], [1, 2]], [[0], [1]])  # the teacher's text ended without an EOS
    # a special token at the start on one side only joins the first span
    assert spans_of([(0, 0), (0, 2), (2, 4)], [(0, 2), (2, 4)]) == ([[0, 1], [2]], [[0], [1]])


def test_boundaries_that_never_meet_again_make_one_span_to_the_end():
    a = [(0, 1), (1, 3), (3, 5), (5, 7), (7, 8), (8, 8)]
    b = [(0, 1), (1, 2), (2, 4), (4, 6), (6, 8), (8, 8)]
    assert spans_of(a, b) == ([[0], [1, 2, 3, 4], [5]], [[0], [1, 2, 3, 4], [5]])
    assert align([], b).count == 0 and align(a, []).count == 0


@pytest.mark.parametrize("text", ["12+30=42, so the answer is 42.", "hello world", "a  b\nc"])
def test_the_character_tokenizer_against_a_byte_bpe_on_ascii(text):
    char, bpe = char_tokenizer(), byte_bpe()
    char_ids = char(text, add_special_tokens=False)["input_ids"]
    decoded, char_intervals = decoded_intervals(char, char_ids)
    assert decoded == text and char_intervals == [(k, k + 1) for k in range(len(text))]
    bpe_ids, bpe_intervals = encoded_intervals(bpe, decoded)
    spans = align(char_intervals, bpe_intervals)
    assert spans.count == len(bpe_ids)  # every BPE token is a span of the characters it covers
    for span, members in enumerate(spans.members("a")):
        assert "".join(text[k] for k in members) == bpe.decode([bpe_ids[span]])
    same = align(char_intervals, encoded_intervals(char, decoded)[1])
    assert same.of_a == same.of_b == tuple(range(len(text)))


def test_sampled_ids_the_tokenizer_would_not_produce_and_characters_split_into_bytes():
    bpe = byte_bpe()
    text = "x é€😀 café"
    canonical, _ = encoded_intervals(bpe, text)
    # the same text as single-byte tokens (a model may sample that): decode each byte's token separately
    byte_ids = [bpe.convert_tokens_to_ids(byte) for token in bpe.convert_ids_to_tokens(canonical) for byte in token]
    assert bpe.decode(byte_ids) == text and len(byte_ids) > len(canonical)
    decoded, byte_intervals = decoded_intervals(bpe, byte_ids + [bpe.eos_token_id])
    assert decoded == text
    assert byte_intervals[2:4] == [(2, 3), (2, 3)]  # é: two bytes, one character
    assert byte_intervals[4:7] == [(3, 4)] * 3 and byte_intervals[7:11] == [(4, 5)] * 4
    assert byte_intervals[-1] == (len(text), len(text))  # the EOS: empty, at the end
    _, canonical_intervals = encoded_intervals(bpe, decoded)
    spans = align(byte_intervals, canonical_intervals + [(len(text), len(text))])
    for span_bytes, span_canonical in zip(spans.members("a"), spans.members("b")):
        assert bpe.decode([byte_ids[k] for k in span_bytes if k < len(byte_ids)]) == bpe.decode(
            [canonical[k] for k in span_canonical if k < len(canonical)])
    assert spans.members("a")[-1] == [len(byte_ids)]  # the two EOS pair up
    char = char_tokenizer()  # the character tokenizer against the byte tokens, on the ASCII part
    ascii_text = "x caf"
    spans = align(decoded_intervals(char, char(ascii_text, add_special_tokens=False)["input_ids"])[1],
                  decoded_intervals(bpe, [bpe(c, add_special_tokens=False)["input_ids"][0] for c in ascii_text])[1])
    assert spans.count == len(ascii_text)



def test_a_sentencepiece_style_tokenizer_keeps_the_spaces_its_pieces_carry():
    """Metaspace pieces ("▁world") lose their space when decoded alone: each is decoded behind its context instead."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(["hello world, the answer is 42 and the world is café"] * 20,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    sp = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    text = "the world is hello 42"
    ids = sp(text, add_special_tokens=False)["input_ids"]
    assert "".join(sp.batch_decode([[i] for i in ids])) != text  # decoded alone, the pieces lose their spaces
    decoded, intervals = decoded_intervals(sp, ids + [sp.eos_token_id])
    assert decoded == text
    pieces = [sp.convert_ids_to_tokens(i).replace("▁", " ") for i in ids]
    assert [text[a:b] for a, b in intervals[:-1]] == [pieces[0].lstrip(), *pieces[1:]]  # the text's first space is not in it
    assert intervals[-1] == (len(text), len(text))


class ByteTokens:
    """A tokenizer whose tokens are byte strings (ids 0-255 single bytes, then a few pairs), decoded as UTF-8 with
    replacement characters, as byte-level tokenizers decode; id 999 is its EOS."""

    EOS = 999
    all_special_ids = [EOS]

    def __init__(self, pairs: list[bytes]):
        self.bytes_of = {i: bytes([i]) for i in range(256)} | {256 + n: pair for n, pair in enumerate(pairs)}
        self.id_of = {b: i for i, b in self.bytes_of.items()}

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        return b"".join(self.bytes_of[i] for i in ids if i != self.EOS).decode("utf-8", errors="replace")

    def batch_decode(self, lists, **kwargs):
        return [self.decode(ids, **kwargs) for ids in lists]


def test_a_token_that_ends_one_character_and_starts_the_next_is_decoded_from_where_its_run_began(monkeypatch):
    from opd.models import alignment

    # "a你好": 你 = e4 bd a0, 好 = e5 a5 bd, split as  a | e4 bd | a0 e5 | a5 bd
    tok = ByteTokens([b"\xe4\xbd", b"\xa0\xe5", b"\xa5\xbd"])
    ids = [ord("a"), 256, 257, 258]
    monkeypatch.setattr(alignment, "_by_prefix", lambda *a: pytest.fail("the windowed decoding should not need the fallback"))
    text, intervals = decoded_intervals(tok, ids * 200 + [tok.EOS])  # long: a quadratic fallback would show
    assert text == "a你好" * 200
    assert intervals[:4] == [(0, 1), (1, 3), (1, 3), (1, 3)] and intervals[4:8] == [(3, 4), (4, 6), (4, 6), (4, 6)]
    assert intervals[-1] == (600, 600)


def test_a_character_cut_short_by_the_end_of_the_reply_keeps_its_replacement_character():
    tok = ByteTokens([b"\xe4\xbd"])
    text, intervals = decoded_intervals(tok, [ord("a"), 256, tok.EOS])
    assert text == "a\ufffd" and intervals == [(0, 1), (1, 2), (2, 2)]
    spans = align(intervals, [(0, 1), (1, 2), (2, 2)])  # the teacher reads the replacement character, then its EOS
    assert spans.of_a == spans.of_b == (0, 1, 2)
