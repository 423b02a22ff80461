"""Chat messages -> prompt token ids through the tokenizer's own chat template.

Only the template's own markers may become special tokens. A message whose text spells one
(`<|system|>` in a user message) must not open a new turn: when the rendered conversation holds
more special-token text than the template wrote itself, the contents are tokenized on their own
with special-token parsing off and spliced between the template's pieces. Other conversations
are tokenized whole, exactly as the template renders them.
"""
from __future__ import annotations

from server.api.errors import bad_request
from server.api.protocol import ChatMessage

# Stand-ins for message contents while the template renders the layout. The layout holds only
# the template's text, the roles (a fixed set) and these slots, so a client cannot forge a slot.
_SLOT = "\ue000kvsplice-content-{}\ue001"


def render_chat(tokenizer, messages: list[ChatMessage]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    contents = [_text_of(m, i) for i, m in enumerate(messages)]
    slots = [_SLOT.format(i) for i in range(len(contents))]
    text, layout = _render(tokenizer, messages, contents), _render(tokenizer, messages, slots)
    markers = special_texts(tokenizer)
    if _count(text, markers) == _count(layout, markers):  # every special token is the template's
        # The template writes the special tokens (BOS included) itself; adding them again would double BOS.
        return tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    return _splice(tokenizer, layout, slots, contents)


def _count(text: str, markers: list[str]) -> int:
    return sum(text.count(marker) for marker in markers)


def special_texts(tokenizer) -> list[str]:
    """The texts that the tokenizer turns into a single added token (special or not)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {str(token) for token in added.values()} | set(tokenizer.all_special_tokens)
    return [text for text in texts if text]


def _splice(tokenizer, layout: str, slots: list[str], contents: list[str]) -> list[int]:
    """The layout's template pieces keep their special tokens; the contents put in its slots lose theirs."""
    ids: list[int] = []
    rest = layout
    for i, slot in enumerate(slots):
        before, found, rest = rest.partition(slot)
        if not found or slot in rest:
            # The template changed or repeated a content: there is no safe place to put its text.
            raise bad_request(f"messages.{i}.content: contains special-token text that this model's chat template "
                              "cannot take safely; remove it", "messages")
        ids += _tokens(tokenizer, before, special=True)
        ids += _tokens(tokenizer, contents[i], special=False)
    return ids + _tokens(tokenizer, rest, special=True)


def _tokens(tokenizer, text: str, special: bool) -> list[int]:
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=not special, verbose=False).input_ids


def _render(tokenizer, messages: list[ChatMessage], contents: list[str]) -> str:
    conversation = [{"role": m.role, "content": c} for m, c in zip(messages, contents)]
    try:
        return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # templates raise (jinja) errors for conversations they do not accept
        raise bad_request(f"messages: the chat template rejected them: {exc}", "messages") from None


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
