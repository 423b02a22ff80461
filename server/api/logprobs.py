"""Log-probabilities in the two OpenAI formats: legacy completions and chat."""
from __future__ import annotations

from collections.abc import Sequence

from server.api.protocol import ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs
from server.engine.outputs import TokenLogprob


class TokenText:
    """Token id -> the text clients see for it; cached because this is per token, per request."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._special = set(tokenizer.all_special_ids)

    def width(self, token_id: int) -> int:
        """Characters the token takes in the answer text: none for special tokens (BOS), which
        appear in `tokens` but not in the echoed prompt."""
        return 0 if token_id in self._special else len(self(token_id))

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id])
        return text


def completion_logprobs(token_text: TokenText, token_ids: Sequence[int],
                        entries: Sequence[TokenLogprob | None], start_offset: int = 0) -> CompletionLogprobs:
    """Legacy format. `entries[i]` is None where there is no log-probability (the first prompt token).

    The chosen token is always in its `top_logprobs` entry, as OpenAI does: lm-evaluation-harness
    decides "greedy" by comparing the chosen logprob with the best one in that dict.
    """
    result = CompletionLogprobs()
    offset = start_offset
    for token_id, entry in zip(token_ids, entries):
        text = token_text(token_id)
        result.tokens.append(text)
        result.text_offset.append(offset)
        offset += token_text.width(token_id)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        top = {token_text(tid): lp for tid, lp in entry.top}
        top.setdefault(text, entry.logprob)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append(top)
    return result


def text_width(token_text: TokenText, token_ids: Sequence[int]) -> int:
    return sum(token_text.width(t) for t in token_ids)


def join(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs,
        text_offset=first.text_offset + second.text_offset,
    )


def chat_logprobs(token_text: TokenText, entries: Sequence[TokenLogprob], top_k: int) -> ChatLogprobs:
    def item(token_id: int, logprob: float) -> ChatTopLogprob:
        text = token_text(token_id)
        return ChatTopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    content = []
    for entry in entries:
        chosen = item(entry.token_id, entry.logprob)
        top = [item(tid, lp) for tid, lp in entry.top[:top_k]]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)
