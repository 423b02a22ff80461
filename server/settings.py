"""The server's one settings object: CLI flags > KVSPLICE_* environment > config file > defaults.

Flags arrive as constructor keyword arguments (pydantic-settings' "init" source, the strongest);
the config file is named by the `config` setting itself, so `--config` and `KVSPLICE_CONFIG` both
work. Every field is validated here, at start-up, so a bad value fails with a message that names
it instead of surfacing later from deep inside the engine.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from server.api.endpoints import DEFAULT_PORT
from server.engine.config import EngineConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; YAML config files still work
    tomllib = None

ENV_PREFIX = "KVSPLICE_"


class InvalidSettings(ValueError):
    """A setting is wrong; the message names it (`compression_ratio: must be in (0, 1]`)."""


def _at_least(low: float):
    def check(value: Any) -> Any:
        if value is not None and value < low:
            raise ValueError(f"must be >= {low}")
        return value

    return AfterValidator(check)


def _in_unit_interval(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError("must be in (0, 1]")
    return value


def _valid_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be in [1, 65535]")
    return value


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _parse_size(value: Any) -> Any:
    """Accept a byte count as an int or as text with a unit ("8GiB", "512MB"): budgets are written that way."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a byte size: {value!r} (use e.g. 4294967296, 4GiB or 512MB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _valid_api_key(value: str | None) -> str | None:
    """An empty key must not mean "no key": that would start an open server by accident."""
    if value is None:
        return None
    if not value:
        raise ValueError("is empty; give a key, or leave the setting out to serve without one")
    if any(ch.isspace() for ch in value):
        raise ValueError("contains whitespace (a key read from a file with its trailing newline?)")
    if not all(0x21 <= ord(ch) <= 0x7E for ch in value):
        raise ValueError("must be printable ASCII: clients send it in an HTTP header")
    return value


def _in_seed_range(value: int) -> int:
    if not -(2**63) <= value < 2**63:
        raise ValueError("must be a 64-bit signed integer")
    return value


AtLeastOne = Annotated[int, _at_least(1)]
UnitFraction = Annotated[float, AfterValidator(_in_unit_interval)]
ByteSize = Annotated[int, BeforeValidator(_parse_size), _at_least(1)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", env_ignore_empty=True)

    config: str | None = Field(None, description="YAML or TOML file with settings (flags and env win over it)")
    # What to serve.
    model: str = Field("builtin", description="hub id, local path, or 'builtin' (the tiny model in the package); "
                       "with load_format dummy also a shipped config: deepseek-v2-lite, deepseek-v2")
    load_format: Literal["auto", "dummy"] = Field(
        "auto", description="auto: the checkpoint's weights; dummy: seeded random weights of the model's shape "
                            "(for speed and capacity tests: speed does not depend on the values)")
    served_model_name: Annotated[list[str] | None, NoDecode] = Field(
        None, description="names clients may use in 'model', the first reported in responses (default: the "
                          "model's name); in env and files comma-separated")
    trust_remote_code: bool = Field(False, description="allow custom model code from the model repo")
    tokenizer: str | None = Field(None, description="tokenizer hub id or path (default: the model's)")
    revision: str | None = Field(None, description="the model's revision on the hub: a branch, tag or commit")
    chat_template: str | None = Field(
        None, description="a Jinja chat template, inline or a file, instead of the tokenizer's")
    max_logprobs: Annotated[int, _at_least(0)] = Field(
        20, description="the most log-probabilities per token a request may ask for (logprobs, top_logprobs)")
    seed: Annotated[int, AfterValidator(_in_seed_range)] = Field(
        0, description="seeds the data-free orthogonal splices and dummy weights (requests seed their own sampling)")
    # How to run it.
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float", "half"] = Field(
        "auto", description="weights and KV dtype (vLLM's float and half are float32 and float16)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    enable_prefix_caching: bool = Field(
        True, description="reuse the KV blocks of a prompt prefix already in the cache (vLLM's default)")
    async_scheduling: bool = Field(
        True, description="schedule and launch each step before the previous one's tokens are back (host work "
                          "overlaps the GPU; a request ending on EOS or a stop token costs one dropped token)")
    cuda_graphs: bool = Field(True, description="capture the decode step in CUDA graphs (CUDA only)")
    fused_moe: bool = Field(True, description="the Triton routed-experts kernel on CUDA (off: the plain-torch reference)")
    attention_backend: Literal["auto", "torch", "triton"] = Field(
        "auto", description="auto: Triton's MLA decode kernel on CUDA, the torch reference elsewhere")
    pipeline_parallel_size: AtLeastOne = Field(
        1, description="GPUs the layers are split over, in one process (per tensor-parallel rank)")
    tensor_parallel_size: AtLeastOne = Field(
        1, description="ranks the model is sharded over, one process and GPU each (heads, experts, vocabulary); "
                       "started by the server, or by torchrun with as many ranks")
    enable_expert_parallel: bool = Field(
        False, description="with tensor_parallel_size > 1: give each rank whole routed experts instead of a "
                           "slice of every expert's columns")
    # KVSplice and the KV cache.
    compression_ratio: UnitFraction | None = Field(
        None, description="fraction of the latent dims stored, in (0, 1]; 1.0 = plain MLA (default: the splice "
                          "file's ratio with --splice-file, else 1.0)")
    splice_file: str | None = Field(None, description="calibrated splice file (safetensors)")
    splice_init: Literal["truncate", "orthogonal"] = Field(
        "truncate", description="data-free splice initialisation when there is no splice file (pca and learned "
                                "splices need calibration data: make a file with `kvsplice calibrate`)")
    kv_cache_bytes: ByteSize | None = Field(
        None, description="KV cache budget (bytes, or e.g. 8GiB); wins over the fraction")
    kv_cache_memory_fraction: UnitFraction = Field(
        0.5, description="KV budget as a fraction of free device memory (CUDA) or RAM (CPU)")
    gpu_memory_utilization: UnitFraction | None = Field(
        None, description="vLLM's: the share of the GPU's total memory this server may use for weights, "
                          "activations and KV; KV gets the rest after the weights and an activation estimate "
                          "(wins over kv_cache_memory_fraction; kv_cache_bytes wins over it)")
    block_size: AtLeastOne = Field(16, description="tokens per KV block")
    kv_cache_dtype: Literal["auto", "bf16", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        "auto", description="how the cached code is stored: auto/bf16 in the model dtype; fp8 (= fp8_e4m3) or "
                            "fp8_e5m2 as fp8 values with a float32 scale per token (the RoPE key stays in the model "
                            "dtype; ~1.76x the tokens per byte at ratio 1.0, stacks with the splice)")
    # Scheduling and admission.
    max_num_seqs: AtLeastOne = Field(64, description="running sequences at most")
    max_num_batched_tokens: AtLeastOne = Field(2048, description="prefill + decode tokens per engine step at most")
    max_model_len: AtLeastOne | None = Field(None, description="context length (default: the model's, capped at 8192)")
    max_waiting_requests: Annotated[int, _at_least(0)] = Field(
        256, description="queued requests beyond which new ones get 429")
    # HTTP.
    host: str = Field("127.0.0.1", description="address to listen on")
    port: Annotated[int, AfterValidator(_valid_port)] = Field(DEFAULT_PORT, description="port to listen on")
    api_key: Annotated[str | None, AfterValidator(_valid_api_key)] = Field(
        None, description="require 'Authorization: Bearer KEY' on every path but /health (and /metrics, see below)")
    metrics_require_api_key: bool = Field(
        False, description="with api_key, /metrics needs the key too (default: open for Prometheus, as in vLLM)")
    max_request_body_bytes: ByteSize = Field(
        8 * 2**20, description="request bodies beyond this many bytes (or e.g. 8MiB) get 413")
    request_header_timeout_s: Annotated[float, _at_least(0.1)] = Field(
        10.0, description="a connection whose request headers are not complete in this time is closed (408)")
    request_body_timeout_s: Annotated[float, _at_least(0.1)] = Field(
        30.0, description="a request body not received in full within this time gets 408")
    vllm_metric_names: bool = Field(
        True, description="also expose every /metrics series under vLLM's vllm: prefix (with the older names "
                          "vLLM's example dashboard queries), so dashboards and alerts written for vLLM work")
    enable_log_requests: bool = Field(
        True, description="log one info line per finished request (id, finish reason, tokens, TTFT, latency)")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field("info", description="log level")
    drain_timeout_s: Annotated[float, _at_least(0)] = Field(
        30.0, description="on SIGTERM, how long in-flight requests may take to finish (then they get 503)")

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",")]
        if isinstance(value, list) and not all(isinstance(n, str) and n for n in value):
            raise ValueError("names must be non-empty strings")
        return value or None

    @field_validator("dtype", mode="after")
    @classmethod
    def _dtype_name(cls, value: str) -> str:
        return {"float": "float32", "half": "float16"}.get(value, value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Order is precedence: flags (init kwargs) > environment > config file > field defaults.
        return init_settings, env_settings, ConfigFileSource(settings_cls)

    def engine_config(self) -> EngineConfig:
        """The engine's part of the settings, copied by field name so new engine fields need no code here."""
        names = {f.name for f in dataclasses.fields(EngineConfig)} & set(type(self).model_fields)
        return EngineConfig(**{name: getattr(self, name) for name in names})


class ConfigFileSource(PydanticBaseSettingsSource):
    """Values from the file named by `config`, as already resolved from the flags and environment."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole file at once

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config")
        return read_config_file(path) if path else {}


def read_config_file(path: str) -> dict[str, Any]:
    """A flat mapping of settings from YAML (.yaml/.yml/.json) or TOML (.toml); keys may use '-' or '_'."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise InvalidSettings(f"config: cannot read {path}: {exc.strerror}") from None
    data = _parse_toml(path, text) if file.suffix.lower() == ".toml" else _parse_yaml(path, text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidSettings(f"config: {path} must hold a mapping of setting names to values")
    values = {str(key).replace("-", "_"): value for key, value in data.items()}
    if "config" in values:
        raise InvalidSettings(f"config: {path} may not name another config file")
    if "api_key" in values and values["api_key"] is None:  # `api_key:` with nothing after it
        raise InvalidSettings(f"api_key: is empty in {path}; give a key, or remove the line to serve without one")
    return values


def _parse_yaml(path: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidSettings(f"config: {path} is not valid YAML: {exc}") from None


def _parse_toml(path: str, text: str) -> Any:
    if tomllib is None:
        raise InvalidSettings(f"config: {path}: TOML needs Python 3.11 or later; use a YAML file")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidSettings(f"config: {path} is not valid TOML: {exc}") from None


def load_settings(**flags: Any) -> Settings:
    """Build the settings from flags (keyword arguments), the environment and the config file.

    Raises InvalidSettings with one line per bad field, each starting with the field's name.
    """
    # The environment ignores empty values (Compose passes `VAR=` for unset variables), except the
    # API key: KVSPLICE_API_KEY="" must not start an open server while its operator thinks otherwise.
    if os.environ.get(f"{ENV_PREFIX}API_KEY") == "" and "api_key" not in flags:
        raise InvalidSettings(f"api_key: {ENV_PREFIX}API_KEY is set but empty; give a key, or unset it to serve "
                              "without one")
    try:
        return Settings(**flags)
    except ValidationError as exc:
        raise InvalidSettings(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        lines.append(f"{name}: {message}")
    return "; ".join(lines)
