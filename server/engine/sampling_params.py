"""Per-request sampling settings (the vLLM SamplingParams contract, trimmed to what we serve)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # the engine's default cap (its max_logprobs setting); checked at add_request
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, 100 all but forces it
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]
# Below this temperature sampling is greedy (vLLM's convention): dividing logits by a tiny
# temperature overflows float32 to inf, and the softmax of that is NaN.
GREEDY_TEMPERATURE = 1e-5
# torch.Generator.manual_seed takes a signed 64-bit integer (vLLM's range for `seed` too).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k filter
    min_tokens: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Top-k log-probabilities returned per generated token (0: only the chosen token's); None: none.
    logprobs: int | None = None
    # Same for the prompt tokens (OpenAI `echo` + `logprobs`); None: none.
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's)
    # OpenAI's: minus presence_penalty for a token generated before, minus frequency_penalty per time.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # transformers' / vLLM's: logits of tokens in the prompt or the output divided by it (if positive,
    # multiplied if negative); 1.0 is off.
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only (benchmarks on random weights); stop strings need it

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def validate(self) -> None:
        """Raise ValueError naming the offending field first; the API turns it into a 400."""
        for message in self._problems():
            raise ValueError(message)

    def _problems(self) -> list[str]:
        # Every message starts with the field's name: the API takes the first word as `param`.
        checks = [
            (_finite(self.temperature), "temperature must be a finite number"),
            (_finite(self.top_p), "top_p must be a finite number"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0.0, "temperature must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 0, "top_k must be -1 (off) or >= 0"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens must be in [0, max_tokens]"),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
             f"seed must be a 64-bit signed integer, in [{SEED_MIN}, {SEED_MAX}]"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs must be >= 0"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs must be >= 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (all(isinstance(t, int) and t >= 0 and _finite(b) and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS
                 for t, b in self.logit_bias.items()),
             f"logit_bias must map token ids to numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"),
            (self.detokenize or not self.stop, "stop strings need detokenize=True"),
            (_finite(self.presence_penalty) and abs(self.presence_penalty) <= MAX_PENALTY,
             f"presence_penalty must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
            (_finite(self.frequency_penalty) and abs(self.frequency_penalty) <= MAX_PENALTY,
             f"frequency_penalty must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
            (_finite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        return [message for ok, message in checks if not ok]


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
