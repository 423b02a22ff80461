"""Turns the engine core's token deltas into what clients see: text, stop strings, cumulative outputs.

Per request it keeps an incremental detokenizer and the text so far. A stop string ends the request
(the caller then finishes it in the core); until a request ends, the tail of its text that could
still turn out to be the start of a stop string is held back. A failure here (the tokenizer, say)
fails that one request.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from server.engine import faults
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.engine_core import CoreOutput
from server.engine.outputs import RequestOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _RequestState:
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    hold: int  # characters held back while running: a stop string's length - 1
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    emitted_text_len: int = 0
    emitted_token_len: int = 0


@dataclass
class Processed:
    outputs: list[RequestOutput]
    to_finish: list[tuple[str, str, str | None]]  # (request_id, reason, stop string or error) for the core


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Start tracking a request; ValueError if its prompt cannot even be decoded."""
        try:
            detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
        except Exception as exc:  # nothing is queued yet: refusing this request is all it takes
            raise ValueError(f"prompt could not be prepared: {type(exc).__name__}: {exc}") from None
        hold = max((len(s) - 1 for s in params.stop), default=0)
        self._requests[request_id] = _RequestState(prompt_token_ids, params, detokenizer, hold)

    def process(self, core_outputs: list[CoreOutput]) -> Processed:
        done = Processed([], [])
        for core in core_outputs:
            state = self._requests.get(core.request_id)
            if state is None:
                continue  # already ended here (a stop string) before the core heard of it
            try:
                stop = self._advance(state, core)
            except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer failure: fail this request only
                self._fail(core, f"handling its new token failed: {type(exc).__name__}: {exc}", exc, done)
            else:
                if stop is not None and not core.finished:
                    core.finish_reason, core.stop_reason = "stop", stop
                    done.to_finish.append((core.request_id, "stop", stop))
            done.outputs.append(self._safe_output(core.request_id, state, core, done))
        return done

    @staticmethod
    def _fail(core: CoreOutput, message: str, exc: Exception, done: Processed) -> None:
        # An exception here is a bug to find: log its traceback.
        log.warning("request %s failed: %s", core.request_id, message, exc_info=exc)
        if not core.finished:
            done.to_finish.append((core.request_id, "error", message))
        core.finish_reason, core.error = "error", core.error or message

    def _safe_output(self, request_id: str, state: _RequestState, core: CoreOutput, done: Processed) -> RequestOutput:
        """The request's output; if that cannot be built, it fails (alone) with one that carries the reason."""
        try:
            faults.check("output", state.params.seed)
            return self._output(request_id, state, core)
        except Exception as exc:  # noqa: BLE001
            self._fail(core, f"building the output failed: {type(exc).__name__}: {exc}", exc, done)
            self._requests.pop(request_id, None)
            return RequestOutput(request_id=request_id, prompt_token_ids=state.prompt_token_ids, text="",
                                 delta_text="", token_ids=[], delta_token_ids=[], finished=True,
                                 finish_reason="error", error=core.error, times=core.times)

    def _advance(self, state: _RequestState, core: CoreOutput) -> str | None:
        """Take in the new tokens; the stop string found in the text, if any (the text is cut there)."""
        state.token_ids.extend(core.new_token_ids)
        state.logprobs.extend(core.new_logprobs)
        if not state.params.detokenize:
            return None
        faults.check("detokenize", state.params.seed)
        for token in core.new_token_ids:
            state.text += state.detokenizer.push(token)
        if state.params.stop and len(state.token_ids) >= state.params.min_tokens:
            for stop in state.params.stop:
                at = state.text.find(stop)
                if at != -1:
                    state.text = state.text[:at]
                    return stop
        return None

    def _output(self, request_id: str, state: _RequestState, core: CoreOutput) -> RequestOutput:
        finished = core.finished
        hold = 0 if finished else state.hold
        upto = max(state.emitted_text_len, len(state.text) - hold)
        delta_text = state.text[state.emitted_text_len:upto]
        delta_ids = state.token_ids[state.emitted_token_len:]
        state.emitted_text_len, state.emitted_token_len = upto, len(state.token_ids)
        if finished:
            del self._requests[request_id]
        return RequestOutput(
            request_id=request_id, prompt_token_ids=state.prompt_token_ids, text=state.text[:upto],
            delta_text=delta_text, token_ids=list(state.token_ids), delta_token_ids=delta_ids, finished=finished,
            finish_reason=core.finish_reason, stop_reason=core.stop_reason, error=core.error,
            logprobs=list(state.logprobs) if state.params.logprobs is not None else None,
            prompt_logprobs=core.prompt_logprobs, times=core.times, num_preemptions=core.num_preemptions,
        )

    def abort(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
