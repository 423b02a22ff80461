"""Chat messages -> prompt token ids through the tokenizer's own chat template."""
from __future__ import annotations

from server.api.errors import bad_request
from server.api.protocol import ChatMessage


def render_chat(tokenizer, messages: list[ChatMessage]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    conversation = [{"role": m.role, "content": _text_of(m, i)} for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # templates raise (jinja) errors for conversations they do not accept
        raise bad_request(f"messages: the chat template rejected them: {exc}", "messages") from None
    # The template writes the special tokens (BOS included) itself; adding them again would double BOS.
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids


def _text_of(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise bad_request(f"messages.{index}.content: only text parts are supported, got {part.type!r}",
                              "messages")
        parts.append(part.text)
    return "".join(parts)
