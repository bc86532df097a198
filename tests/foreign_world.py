"""A model pair of the kind users bring, built by the tests themselves (no downloads): Qwen3-architecture student
and teacher sharing a byte-level BPE tokenizer with a ChatML chat template, the teacher's output layer padded
beyond the tokenizer (as in families whose larger members have more embedding rows), and chat-shaped data.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    lines = [f"What is {a} plus {b}? The answer is \\boxed{{{a + b}}}." for a in range(30) for b in range(0, 30, 3)]
    lines += ["Reason step by step, and put your final answer in \\boxed{}.", "Here is a reference solution:",
              "Now give your own step-by-step reasoning that reaches the same answer.", "<think>\n\n</think>\n\n"]
    return lines


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return fast


def build_model(directory: Path, tokenizer, hidden: int, layers: int, extra_rows: int = 0, seed: int = 0, context: int = 160) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer) + extra_rows, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=context,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_pair(root: Path, context: int = 160) -> tuple[Path, Path]:
    """``(student, teacher)`` directories: the teacher wider and deeper, its output layer 64 rows past the tokenizer."""
    tokenizer = build_tokenizer(root / "tokenizer")
    student = build_model(root / "student", tokenizer, hidden=32, layers=1, seed=1, context=context)
    teacher = build_model(root / "teacher", tokenizer, hidden=48, layers=2, extra_rows=64, seed=2, context=context)
    return student, teacher


def chat_rows(n: int, with_answer: bool = True, with_reply: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 17, (3 * i) % 11
        messages = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": f"What is {a} plus {b}?"}]
        if with_reply:
            messages.append({"role": "assistant", "content": f"{a} plus {b} is {a + b}, so \\boxed{{{a + b}}}."})
        rows.append({"messages": messages, **({"answer": str(a + b)} if with_answer else {})})
    return rows


def prompt_rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?"} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
