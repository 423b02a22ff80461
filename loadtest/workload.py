"""What to send: a reproducible, endless sequence of prompts with their output lengths.

Request i depends only on (seed, i), never on what was drawn before, so two servers compared with
the same seed get exactly the same requests in the same order, whatever the timing.
Prompt lengths are in words (see words.py): the tool does not tokenize; it reports the token
counts the server returns in `usage`.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from loadtest.lengths import LengthSpec
from loadtest.words import WORDS

KINDS = ("random", "text", "jsonl", "long")
DEFAULT_INPUT_LEN = LengthSpec.fixed(128)
DEFAULT_OUTPUT_LEN = LengthSpec.fixed(64)
LONG_CONTEXT_FILL = 0.9  # long prompts leave headroom: words are not exactly tokens


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: str
    prompt_words: int
    max_tokens: int


@dataclass(frozen=True)
class WorkloadConfig:
    kind: str = "random"
    input_len: LengthSpec | None = None  # None: the kind's default (long: from the server's context length)
    output_len: LengthSpec = DEFAULT_OUTPUT_LEN
    path: str | None = None  # text or JSONL file
    seed: int = 0
    shared_prefix_len: int = 0  # words every prompt starts with (one fixed text per seed): prefix caching

    def validate(self) -> None:
        """Fail before any load is sent: a kind that needs a file has one, and it exists."""
        if self.kind not in KINDS:
            raise ValueError(f"unknown dataset {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind in ("text", "jsonl") and not self.path:
            raise ValueError(f"--dataset {self.kind} needs --dataset-path")
        if self.path and not Path(self.path).is_file():
            raise ValueError(f"--dataset-path {self.path}: no such file")
        if self.shared_prefix_len < 0:
            raise ValueError("--shared-prefix-len must be >= 0")


class Workload:
    def __init__(self, config: WorkloadConfig, max_model_len: int | None = None):
        config.validate()
        self.config = config
        self.output_len = config.output_len
        self.input_len = config.input_len or _default_input_len(config, max_model_len)
        self._text_words = _read_words(config.path) if config.kind in ("text", "long") and config.path else None
        self._records = _read_jsonl(config.path) if config.kind == "jsonl" else None
        prefix_rng = random.Random(f"{config.seed}:shared-prefix")
        self._prefix = " ".join(prefix_rng.choice(WORDS) for _ in range(config.shared_prefix_len))

    def describe(self) -> str:
        if self._records is not None:
            return f"jsonl {self.config.path} ({len(self._records)} prompts), seed {self.config.seed}"
        source = f"text of {self.config.path}" if self._text_words else "random words"
        shared = f" after a shared prefix of {self.config.shared_prefix_len} words" if self._prefix else ""
        return (f"{self.config.kind}: {source}, input {self.input_len} words{shared}, "
                f"output {self.output_len} tokens, seed {self.config.seed}")

    def request(self, index: int) -> RequestSpec:
        rng = random.Random(f"{self.config.seed}:{index}")  # str seeds are stable across runs
        spec = self._from_record(index, rng) if self._records is not None else self._generated(index, rng)
        if not self._prefix:
            return spec
        return RequestSpec(index, f"{self._prefix} {spec.prompt}", spec.prompt_words + self.config.shared_prefix_len,
                           spec.max_tokens)

    def _generated(self, index: int, rng: random.Random) -> RequestSpec:
        n = self.input_len.sample(rng)
        words = self._text(n, rng) if self._text_words else [rng.choice(WORDS) for _ in range(n)]
        return RequestSpec(index, " ".join(words), n, self.output_len.sample(rng))

    def _text(self, n: int, rng: random.Random) -> list[str]:
        """n consecutive words of the file from a random place (wrapping round a short file)."""
        words = self._text_words
        start = rng.randrange(len(words))
        return [words[(start + k) % len(words)] for k in range(n)]

    def _from_record(self, index: int, rng: random.Random) -> RequestSpec:
        records = self._records
        # A seeded rotation: different seeds start at different records, order stays the file's.
        offset = random.Random(self.config.seed).randrange(len(records))
        prompt, max_tokens = records[(index + offset) % len(records)]
        return RequestSpec(index, prompt, len(prompt.split()), max_tokens or self.output_len.sample(rng))


def _default_input_len(config: WorkloadConfig, max_model_len: int | None) -> LengthSpec:
    if config.kind != "long":
        return DEFAULT_INPUT_LEN
    if not max_model_len:
        raise ValueError("the long workload needs --input-len: the server does not report max_model_len")
    words = int(max_model_len * LONG_CONTEXT_FILL) - config.output_len.high
    if words < 1:
        raise ValueError(f"output length {config.output_len} leaves no room in a context of {max_model_len}")
    return LengthSpec.fixed(words)


def _read_words(path: str) -> list[str]:
    words = Path(path).read_text(errors="replace").split()
    if not words:
        raise ValueError(f"{path}: no words in the file")
    return words


def _read_jsonl(path: str | None) -> list[tuple[str, int | None]]:
    """(prompt, max_tokens or None) per line; a line is {"prompt": ...} or {"text": ...}, optional
    "max_tokens" / "output_len"."""
    if not path:
        raise ValueError("the jsonl workload needs --dataset-path")
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt = item.get("prompt", item.get("text"))
            max_tokens = item.get("max_tokens", item.get("output_len"))
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{number}: needs a non-empty string 'prompt' (or 'text')")
        records.append((prompt, int(max_tokens) if max_tokens else None))
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records
