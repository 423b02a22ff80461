"""Offline batch generation, vLLM style: `LLM(model=...).generate(prompts, params)`."""
from __future__ import annotations

from dataclasses import fields

from tqdm import tqdm

from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "builtin", **settings) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(settings) - known
        if unknown:
            raise TypeError(f"unknown engine settings: {sorted(unknown)}; known: {sorted(known)}")
        self.engine = LLMEngine(EngineConfig(model=model, **settings))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run all prompts to completion together (continuous batching); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        ids = [f"offline-{id(self)}-{i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, params_list):
            self.engine.add_request(request_id, prompt, p)
        final: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), disable=not use_tqdm, desc="generate") as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        return [final[i] for i in ids]
