"""The embedded search world: a knowledge base of fictional people and places, questions only it answers, and the
scripted tool-using turns that teach a model to search it.

Everything here is generated from a seed (``SearchWorldSpec``), so a rebuild gives the same files:

    corpus.jsonl   one passage per person ("Tarin Voss was born in Dostra.") and per city ("Dostra is a city in
                   Kelvania."): a few thousand short documents, searched with BM25 (``task.corpus``)
    train.jsonl    questions about the training people, each with its ``answers`` and its scripted ``turns``
    eval.jsonl     questions about people no training question asks about: their answers are only in the corpus

A single-hop question ("Where was Tarin Voss born?") takes one search; a two-hop one ("Which country was Tarin
Voss born in?") takes two (the person, then the city). Names are made of a first name and a surname drawn from
small inventories, so every word a held-out name is made of occurs in training, while the pair — and so the
answer — does not; the second passage a search returns is usually someone sharing a first name or surname.

The tokenizer is word-level (``build_word_tokenizer``): one token per word of the world, per punctuation mark and
per space, plus every printable character for anything else, so an episode is about a hundred tokens rather than
the four hundred characters it spells. Its chat template has a tool role (``<tool_response>``) and lists the tools.

This module trains nothing; ``worlds.build.search`` does (with opd's own SFT on the scripted turns), and
``worlds.locate`` finds the built world.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .arithmetic import ModelShape

SEARCH_WORLD_VERSION = 1  # the role fingerprints include it: bump it only when the build itself changes
SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "vax", "bel", "quin", "dra", "sho", "ul", "fen", "gar", "ith", "zo", "pe", "nar", "vis", "el", "dun")
SINGLE_HOP = "Where was {name} born?"
TWO_HOP = "Which country was {name} born in?"
QUESTION_WORDS = "Where was born Which country in is a city Answer search query name arguments tools tool_call tool_response Doc No passage matched the"


@dataclass(frozen=True)
class SearchWorldSpec:
    first_names: int = 48
    surnames: int = 48
    people: int = 2000
    cities: int = 120
    countries: int = 12
    eval_people: int = 200  # people only held-out questions ask about
    train_questions: int = 4000
    eval_questions: int = 200
    two_hop_fraction: float = 0.5
    top_k: int = 2  # passages per search
    max_turns: int = 4
    max_tokens: int = 256  # agent and observation tokens per episode
    max_positions: int = 384
    teacher_shape: ModelShape = ModelShape(192, 4, 512, 6)
    student_shape: ModelShape = ModelShape(160, 4, 448, 5)
    # measured: these models sit at a plateau (the right kind of word in each slot, never the right word) for about
    # 500 SFT steps before they learn to copy the name from the question, and longer before they read the passage
    teacher_steps: int = 2400
    teacher_anneal_steps: int = 1000  # then this many more at anneal_lr, from the first stage's weights
    anneal_lr: float = 7.5e-4
    # measured: the student's reading of the passage forms between SFT steps 900 and 1,200, and is firm by 1,600
    student_steps: int = 1600
    student_anneal_steps: int = 0  # then this many more at anneal_lr, as the teacher
    # the student's scripts make a two-hop question's second search this often; otherwise they answer with the city the
    # first search found (one hop early), so the student reads passages but, greedy, never chains two searches
    student_second_search: float = 0.35
    batch_size: int = 32
    lr: float = 1.5e-3
    warmup_steps: int = 30
    seed: int = 0
    threads: int | None = 2  # fixed so the build is reproducible bit for bit on one machine

    def fingerprint(self) -> str:
        return _digest({"version": SEARCH_WORLD_VERSION, **asdict(self)})

    def role_fingerprint(self, role: str) -> str:
        """What the teacher's or the student's build depends on: the world's data and that role's own settings, so a
        rebuild that changes only the student (``student_second_search``, say) can copy the teacher it had."""
        fields = {k: v for k, v in asdict(self).items() if k not in _ROLE_OWN or k in _ROLE_FIELDS[role]}
        return _digest({"version": SEARCH_WORLD_VERSION, "role": role, **fields})


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


_ROLE_FIELDS = {
    "teacher": ("teacher_shape", "teacher_steps", "teacher_anneal_steps", "anneal_lr"),
    "student": ("student_shape", "student_steps", "student_anneal_steps", "anneal_lr", "student_second_search"),
}
_ROLE_OWN = {name for fields in _ROLE_FIELDS.values() for name in fields}  # every other field is shared by both roles


DEFAULT_SEARCH_SPEC = SearchWorldSpec()
SEARCH_WORLD_FILES = ("tokenizer", "teacher", "student", "corpus.jsonl", "train.jsonl", "eval.jsonl")


@dataclass
class KnowledgeBase:
    people: list[tuple[str, str]]  # (name, city)
    cities: dict[str, str]  # city -> country
    words: list[str] = field(default_factory=list)  # every word the world's names are made of


def _names(rng: random.Random, count: int, syllables: tuple[int, int], taken: set[str], suffix: str = "") -> list[str]:
    names = []
    while len(names) < count:
        name = ("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(*syllables))) + suffix).capitalize()
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def knowledge_base(spec: SearchWorldSpec) -> KnowledgeBase:
    rng = random.Random(f"opd-search-world-{spec.seed}")
    taken: set[str] = set()
    firsts = _names(rng, spec.first_names, (2, 2), taken)
    lasts = _names(rng, spec.surnames, (2, 3), taken)
    countries = _names(rng, spec.countries, (2, 2), taken, suffix="ia")
    cities = {city: rng.choice(countries) for city in _names(rng, spec.cities, (2, 3), taken)}
    pairs = [f"{a} {b}" for a in firsts for b in lasts]
    if spec.people > len(pairs):
        raise ValueError(f"{spec.people} people need more than {spec.first_names} x {spec.surnames} names")
    city_names = sorted(cities)
    people = [(name, rng.choice(city_names)) for name in rng.sample(pairs, spec.people)]
    return KnowledgeBase(people, cities, firsts + lasts + countries + city_names)


def corpus(kb: KnowledgeBase) -> list[dict]:
    """The passages: one per person, then one per city."""
    rows = [{"id": f"p{i}", "title": name, "text": f"{name} was born in {city}."} for i, (name, city) in enumerate(kb.people)]
    rows += [{"id": f"c{i}", "title": city, "text": f"{city} is a city in {country}."} for i, (city, country) in enumerate(sorted(kb.cities.items()))]
    return rows


def search_call(query: str) -> str:
    """An assistant turn that calls the search tool (Hermes / Qwen format, compact JSON)."""
    return "<tool_call>" + json.dumps({"name": "search", "arguments": {"query": query}}, separators=(",", ":")) + "</tool_call>"


def questions(kb: KnowledgeBase, spec: SearchWorldSpec) -> tuple[list[dict], list[dict]]:
    """(train, eval) questions. Training questions ask about the first people (each of them once before any twice);
    held-out ones about the last ``eval_people``, keeping those whose first name and surname both occur in a training
    question (so a held-out name is a new pair of known words)."""
    rng = random.Random(f"opd-search-questions-{spec.seed}")
    trained, held_out = kb.people[: -spec.eval_people], kb.people[-spec.eval_people :]

    def ask(person: tuple[str, str]) -> dict:
        name, city = person
        if rng.random() < spec.two_hop_fraction:
            country = kb.cities[city]
            turns = [search_call(name), search_call(city), f"Answer: {country}"]
            return {"question": TWO_HOP.format(name=name), "answers": [country], "turns": turns, "hops": 2}
        return {"question": SINGLE_HOP.format(name=name), "answers": [city], "turns": [search_call(name), f"Answer: {city}"], "hops": 1}

    order = rng.sample(trained, len(trained))
    asked = [order[i] if i < len(order) else rng.choice(trained) for i in range(spec.train_questions)]
    train = [ask(person) for person in asked]
    seen = {word for name, _ in asked for word in name.split()}
    known = [person for person in held_out if all(word in seen for word in person[0].split())]
    evaluation = [ask(person) for person in rng.sample(known, min(spec.eval_questions, len(known)))]
    return train, evaluation


# ----------------------------------------------------------------------------- tokenizer

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}" + SYSTEM + "tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM + "{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] == 'tool' %}" + USER + "<tool_response>{{ message['content'] }}</tool_response>"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
WORD = r"[A-Za-z_]+|[^A-Za-z_]"  # a word, or any other single character (digits, punctuation, a space)


def build_word_tokenizer(words: list[str]):
    """A word-level HF fast tokenizer: the special tokens, every printable character, then ``words`` (and the words
    of the questions and tool calls); a word it does not know is ``<unk>``. Decoding joins the tokens back exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + characters + sorted(set(QUESTION_WORDS.split()) | set(words)):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(WORD), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left",
        chat_template=CHAT_TEMPLATE, model_max_length=1024,
    )


# ----------------------------------------------------------------------------- its files


def write_data(directory: Path, spec: SearchWorldSpec = DEFAULT_SEARCH_SPEC) -> KnowledgeBase:
    """Write the tokenizer, corpus and questions of ``spec`` under ``directory``."""
    kb = knowledge_base(spec)
    directory.mkdir(parents=True, exist_ok=True)
    build_word_tokenizer(kb.words).save_pretrained(directory / "tokenizer")
    train, evaluation = questions(kb, spec)
    for name, rows in (("corpus", corpus(kb)), ("train", train), ("eval", evaluation)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return kb
