"""The engine as its users see it: prompts and sampling params in, `RequestOutput`s out.

It checks and tokenizes requests, hands them to the engine core (tokens, cache, scheduling) and
passes the core's token deltas through the output processor (text, stop strings). `AsyncLLMEngine`
runs it in a background thread; `LLM` drives it synchronously.
"""
from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer

from server.engine.config import EngineConfig, resolve_max_model_len
from server.engine.engine_core import EngineCore, EngineStats
from server.engine.model_runner import locate_model
from server.engine.output_processor import OutputProcessor
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence
from server.parallel.workers import Workers

log = logging.getLogger(__name__)

__all__ = ["EngineStats", "LLMEngine", "PromptRejected"]


class PromptRejected(ValueError):
    """A request the engine can never serve; `param` names the field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def load_tokenizer(config: EngineConfig, model_dir: str):
    """The model's tokenizer, or `config.tokenizer` (a hub id or path), with `config.chat_template`
    (inline Jinja, or a file) in place of its own; ValueError naming the setting when either fails."""
    from kvsplice.model_source import resolve_model_path

    source = resolve_model_path(config.tokenizer) if config.tokenizer else model_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"tokenizer: cannot load {source!r}: {str(exc).splitlines()[0]}") from exc
    if config.chat_template:
        tokenizer.chat_template = read_chat_template(config.chat_template)
    return tokenizer


def read_chat_template(value: str) -> str:
    """A template given inline or as a file name (vLLM takes both); checked by compiling it."""
    import jinja2

    path = Path(value)
    looks_like_file = "{" not in value and (path.suffix in (".jinja", ".j2", ".txt") or "/" in value)
    if looks_like_file and not path.is_file():
        raise ValueError(f"chat_template: file not found: {value}")
    text = path.read_text() if looks_like_file else value
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat_template: not a valid Jinja template: {exc}") from exc
    return text


class LLMEngine:
    def __init__(self, config: EngineConfig, workers: Workers | None = None) -> None:
        """`workers`: the other tensor-parallel ranks when the caller provides them (default:
        started here when tensor_parallel_size > 1)."""
        self.config = config
        source = locate_model(config)
        self.hf_config = source.config
        self.tokenizer = load_tokenizer(config, source.tokenizer_dir)
        self.max_model_len = resolve_max_model_len(config, self.hf_config)
        self.core = EngineCore(config, self.max_model_len, source, self._eos_ids(), workers)
        self.outputs = OutputProcessor(self.tokenizer)

    def shutdown(self) -> None:
        """Stop the engine's other tensor-parallel ranks, if it has any."""
        self.core.shutdown()

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.hf_config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @property
    def kv_capacity_tokens(self) -> int:
        return self.core.kv_capacity_tokens

    # -- requests ---------------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                return []
            try:
                return self.tokenizer.encode(prompt, add_special_tokens=True)
            except Exception as exc:  # e.g. a lone surrogate, which the tokenizer cannot take
                raise ValueError(f"prompt could not be tokenized: {type(exc).__name__}: {exc}") from None
        self.check_token_ids(prompt)
        return list(prompt)

    def check_token_ids(self, token_ids: list[int]) -> None:
        """Token ids the model can embed. The API's check too, so both refuse the same ids."""
        vocab = self.hf_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise PromptRejected(f"prompt: token ids must be integers in [0, {vocab})", "prompt")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a request; ValueError (nothing queued) if it can never be served."""
        if request_id in self.core.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.tokenize(prompt)
        self.check_fits(len(ids), params.max_tokens)
        self.check_params(params)
        self.outputs.add(request_id, ids, params)
        self.core.add(Sequence(request_id, list(ids), params))

    def check_params(self, params: SamplingParams) -> None:
        """Sampling parameters this engine can honour (its vocabulary, its max_logprobs)."""
        if any(t >= self.hf_config.vocab_size for t in params.logit_bias):
            raise PromptRejected(f"logit_bias: token ids must be in [0, {self.hf_config.vocab_size})", "logit_bias")
        for field in ("logprobs", "prompt_logprobs"):
            if (getattr(params, field) or 0) > self.config.max_logprobs:
                raise PromptRejected(f"{field}: at most {self.config.max_logprobs} (the server's max_logprobs)", field)

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """A request the engine can ever serve; the API asks the same before it streams anything."""
        if prompt_len == 0:
            raise PromptRejected("prompt: must not be empty", "prompt")
        if max_tokens < 1:
            raise PromptRejected("max_tokens: must be >= 1", "max_tokens")
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            raise PromptRejected(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} tokens exceeds the "
                f"model's context length of {self.max_model_len}", "max_tokens")
        if total > self.kv_capacity_tokens:
            raise PromptRejected(f"request needs {total} tokens of KV cache; the whole cache holds "
                                 f"{self.kv_capacity_tokens}", "max_tokens")

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> RequestOutput | None:
        core = self.core.finish(request_id, reason, error)
        if core is None:
            return None
        outputs = self.outputs.process([core]).outputs
        return outputs[0] if outputs else None

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        processed = self.outputs.process(self.core.step())
        for request_id, reason, detail in processed.to_finish:
            # The client already has its final output; the core only frees the request's blocks.
            if reason == "stop":
                self.core.finish(request_id, reason, stop_reason=detail)
            else:
                self.core.finish(request_id, reason, error=detail)
        return processed.outputs

    def stats(self) -> EngineStats:
        return self.core.stats()
