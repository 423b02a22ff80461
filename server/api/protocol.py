"""Request and response bodies of the HTTP API (pydantic models; validation and defaults only).

/generate is ours: strict types and unknown fields rejected. The OpenAI models accept and ignore
fields they do not know, because OpenAI clients send fields such as `user` that change nothing
here; fields that *would* change the result but are not supported are rejected with a 400.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WrapValidator, model_validator

from server.engine.sampling_params import SEED_MAX, SEED_MIN


def one_of(description: str) -> WrapValidator:
    """Replace pydantic's one-error-per-union-member report with a single readable message."""

    def validate(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"must be {description}") from None

    return WrapValidator(validate)


MAX_STOP_STRINGS = 16  # each is searched for after every token: a bound on the engine's work per step
MAX_STOP_CHARS = 1024


def _bounded_stop(value: str | list[str] | None) -> str | list[str] | None:
    stops = [value] if isinstance(value, str) else value or []
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if any(len(stop) > MAX_STOP_CHARS for stop in stops):
        raise ValueError(f"each stop string must be at most {MAX_STOP_CHARS} characters")
    return value


def _in_seed_range(value: int | None) -> int | None:
    if value is not None and not SEED_MIN <= value <= SEED_MAX:
        raise ValueError(f"must be a 64-bit signed integer, in [{SEED_MIN}, {SEED_MAX}]")
    return value


StopStrings = Annotated[str | list[str] | None, one_of("a string or a list of strings"), AfterValidator(_bounded_stop)]
# JSON has no Infinity or NaN, but Python's parser (and so FastAPI's) accepts both, and 1e999 is inf.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int | None, AfterValidator(_in_seed_range)]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


# ---------------------------------------------------------------- /generate


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Annotated[str | list[str], one_of("a string or a list of strings")]
    max_tokens: int = 16
    temperature: FiniteFloat = 1.0
    top_p: FiniteFloat = 1.0
    top_k: int = -1
    stop: StopStrings = None
    seed: Seed = None
    stream: bool = False
    ignore_eos: bool = False
    presence_penalty: FiniteFloat = 0.0
    frequency_penalty: FiniteFloat = 0.0
    repetition_penalty: FiniteFloat = 1.0


class GenerateResult(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage


class GenerateChunk(BaseModel):
    """One server-sent event of a streaming /generate: the text and tokens added since the last one."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None  # on the last event of each prompt


# ---------------------------------------------------------------- OpenAI: shared


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


MAX_N = 16  # choices per prompt (n, best_of): each is its own engine request


class OpenAISampling(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    top_k: int | None = None
    n: int = 1
    stop: StopStrings = None
    seed: Seed = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    repetition_penalty: FiniteFloat | None = None  # vLLM's extension
    logit_bias: dict[str, FiniteFloat] | None = None  # OpenAI's: token id (as a string) -> bias
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> OpenAISampling:
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n: must be in [1, {MAX_N}]")
        if self.logit_bias and not all(key.isdigit() for key in self.logit_bias):
            raise ValueError("logit_bias: keys must be token ids")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported (no JSON mode yet)")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_fields(self) -> dict[str, Any]:
        """The SamplingParams fields these requests share, with OpenAI's defaults for omitted ones."""
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": -1 if self.top_k is None else self.top_k,
            "min_tokens": self.min_tokens, "stop": self.stop or [], "seed": self.seed, "ignore_eos": self.ignore_eos,
            "logit_bias": {int(k): v for k, v in (self.logit_bias or {}).items()},
            "presence_penalty": self.presence_penalty or 0.0, "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
        }


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvsplice"
    max_model_len: int


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # with a prompt: BOS as the completions endpoints add it
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- /v1/completions


PromptInput = Annotated[
    str | list[str] | list[int] | list[list[int]],
    one_of("a string, a list of strings, a list of token ids or a list of token-id lists"),
]


class CompletionRequest(OpenAISampling):
    prompt: PromptInput
    max_tokens: int | None = 16
    logprobs: int | None = None  # legacy format: top-k alternatives per token
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None  # generate this many per prompt, return the n most likely

    @model_validator(mode="after")
    def _refuse_suffix(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix: not supported")
        if self.best_of is not None and not self.n <= self.best_of <= MAX_N:
            raise ValueError(f"best_of: must be in [n, {MAX_N}]")
        if self.stream and (self.best_of or self.n) > self.n:
            raise ValueError("best_of: cannot be streamed (the best are known only at the end)")
        return self

    @property
    def num_sequences(self) -> int:
        """Sequences generated per prompt."""
        return max(self.n, self.best_of or 1)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """Both the whole answer and, with `stream`, each chunk (then `usage` is null but on the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------- /v1/chat/completions


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]  # OpenAI's; the template may refuse some


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: ChatRole
    content: Annotated[str | list[ContentPart] | None, one_of("a string or a list of content parts")] = None
    name: str | None = None


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _refuse_tools(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools: tool calling is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs=true")
        return self


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
