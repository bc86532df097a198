"""A character-level tokenizer with a chat template, built as an ordinary HF fast tokenizer.

Saved with ``save_pretrained`` it loads back through ``AutoTokenizer.from_pretrained`` with
no custom code: the ``tokenizers`` WordLevel model holds one entry per printable ASCII
character, a regex pre-tokenizer isolates every character, and the Fuse decoder joins them.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT]
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 95 printable + "\n"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM + "{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def with_chat_template(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """``backend`` as a transformers tokenizer with the worlds' special tokens, chat template and left padding (for
    batched sampling)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left",
        chat_template=CHAT_TEMPLATE, model_max_length=512,
    )


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Return the embedded world's character tokenizer (left padding, for batched sampling)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return with_chat_template(backend)


def build_byte_bpe_tokenizer(texts: list[str], vocab_size: int = 400, pieces: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme: any text, multi-character tokens merged from ``texts``) with the character
    tokenizer's special tokens and chat template, but ids of its own: a teacher with another tokenizer
    (``teacher.tokenizer=own``, docs/methods.md).

    ``pieces``: a regex whose matches are the pre-tokens merges stay within (in place of GPT-2's split into words,
    numbers and punctuation)."""
    from tokenizers import trainers

    backend = Tokenizer(models.BPE())
    if pieces is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pieces), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return with_chat_template(backend)
