"""Chat-template encoding of prompts and of given completions (reference solutions, demonstrations)."""

from __future__ import annotations


class PromptError(ValueError):
    """A prompt that cannot be used (empty, or too long for the model's context)."""


class ChatTemplateError(ValueError):
    """A ``student.chat_template`` that is neither a readable file nor a Jinja template."""


def chat_template_text(value: str, key: str = "student.chat_template") -> str:
    """The Jinja chat template ``value`` gives: the text itself when it holds a Jinja tag (``{{`` or ``{%``), else
    the contents of the file it names. Its syntax is checked; an error names ``key``."""
    from pathlib import Path

    import jinja2

    if "{{" in value or "{%" in value:
        text = value
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ChatTemplateError(f"config key '{key}' names no file '{value}' (give a .jinja file, or the template's text itself)")
        text = path.read_text(encoding="utf-8")
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"config key '{key}' is not a Jinja template: {err.message} (line {err.lineno})") from None
    return text


def render_prompt(tokenizer, messages: list[dict], template_kwargs: dict | None = None) -> str:
    """The prompt as text, ending where the assistant's reply begins; ``template_kwargs`` go to the chat template
    (e.g. Qwen3's ``enable_thinking``)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {}))
    return "\n\n".join(m["content"] for m in messages) + "\n\n"  # base models: plain text


def prompt_ids(tokenizer, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
    """Token ids of the rendered prompt, unchecked."""
    return tokenizer(render_prompt(tokenizer, messages, template_kwargs), add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, messages: list[dict], max_length: int | None = None, template_kwargs: dict | None = None) -> list[int]:
    """Token ids of the prompt, ending where the assistant's reply begins."""
    if not any(m.get("content", "").strip() for m in messages):
        raise PromptError("empty prompt")
    ids = prompt_ids(tokenizer, messages, template_kwargs)
    if max_length is not None and len(ids) > max_length:
        raise PromptError(f"prompt of {len(ids)} tokens is longer than the {max_length} the context leaves for it")
    return ids


def encode_completion(tokenizer, messages: list[dict], completion: str, template_kwargs: dict | None = None) -> list[int]:
    """Token ids of ``completion`` as the assistant's reply, with whatever the template closes a turn with.

    The reply is the rendered conversation with the answer, minus the rendered prompt, so any
    chat template's end-of-turn tokens are included; without a template, text + EOS.
    """
    if getattr(tokenizer, "chat_template", None):
        prefix = render_prompt(tokenizer, messages, template_kwargs)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": completion}], tokenize=False, **(template_kwargs or {})
        )
        if full.startswith(prefix):
            return tokenizer(full[len(prefix) :], add_special_tokens=False)["input_ids"]
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
