"""Where the weights come from: a transformers checkpoint on disk (or the hub), or random weights.

Modules ask for each tensor by its checkpoint name and expected shape (`WeightSource.get`), so a
checkpoint of another shape fails with the name and both shapes, and random weights (vLLM's
`load_format="dummy"`, for speed measurements: speed does not depend on the values) go through the
same loading code as real ones, splice folding included.

Checkpoints are safetensors, one file or sharded with `model.safetensors.index.json`, read lazily
tensor by tensor straight onto the device that asks. A tensor-parallel rank asks for its `Part` of a
tensor (a range of rows, columns or experts), and only that part is read from the file.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

log = logging.getLogger(__name__)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors a checkpoint may carry that the serving model derives itself.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


# A tensor-parallel rank's share of a weight: dimension -> [start, stop) (e.g. {0: (e0, e1), 1: (i0, i1)}).
Part = dict[int, tuple[int, int]]


def part_index(part: Part, ndim: int) -> tuple[slice, ...]:
    return tuple(slice(*part[d]) if d in part else slice(None) for d in range(ndim))


class WeightSource:
    """A source of named tensors; `get` returns one on `device` (set by the model to the device of
    the layer it is loading) in `dtype`. `shape` is always the whole tensor's (it is checked);
    with `part`, only that part is returned."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.elsewhere: list[str] = []  # name prefixes that other tensor-parallel ranks read

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def get(self, name: str, shape, dtype: torch.dtype | None = None, init: str = "normal",
            part: Part | None = None) -> Tensor:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once everything is loaded."""


class CheckpointWeights(WeightSource):
    def __init__(self, directory: str | Path, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        self.directory = Path(directory)
        self.files = _tensor_files(self.directory)
        self._handles: dict[str, object] = {}
        self._read: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, shape, dtype: torch.dtype | None = None, init: str = "normal",
            part: Part | None = None) -> Tensor:
        if name not in self.files:
            raise KeyError(f"{self.directory}: the checkpoint has no tensor {name!r}; is it a DeepSeek-V2 checkpoint?")
        handle = self._handle(self.files[name])
        stored = handle.get_slice(name)  # reads nothing yet
        if tuple(stored.get_shape()) != tuple(shape):
            raise ValueError(f"{self.directory}: {name} has shape {tuple(stored.get_shape())}, the config says {tuple(shape)}")
        self._read.add(name)
        tensor = handle.get_tensor(name) if part is None else stored[part_index(part, len(shape))]
        return tensor.to(device=self.device, dtype=dtype or self.dtype)

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.directory / file), framework="pt")
        return self._handles[file]

    def finish(self) -> None:
        unused = sorted(n for n in set(self.files) - self._read
                        if not n.endswith(IGNORED_SUFFIXES) and not n.startswith(tuple(self.elsewhere)))
        if unused:
            log.warning("%d checkpoint tensors were not used, e.g. %s", len(unused), unused[:5])
        self._handles.clear()


class RandomWeights(WeightSource):
    """Seeded N(0, std) tensors (ones for norms): every name gets the same values on every run."""

    def __init__(self, device: torch.device, dtype: torch.dtype, std: float = 0.02, seed: int = 0) -> None:
        super().__init__(device, dtype)
        self.std, self.seed = std, seed

    def has(self, name: str) -> bool:
        return not name.endswith("experts.gate_up_proj")  # random weights use the per-expert names

    def get(self, name: str, shape, dtype: torch.dtype | None = None, init: str = "normal",
            part: Part | None = None) -> Tensor:
        """The whole tensor is drawn and then cut, so a rank's part holds the values a single
        device would (one model, whatever the tensor-parallel size)."""
        dtype = dtype or self.dtype
        if init == "ones":
            whole = torch.ones(shape, device=self.device, dtype=dtype)
        else:
            gen = torch.Generator(device=self.device).manual_seed(self.seed ^ zlib.crc32(name.encode()))
            whole = torch.empty(shape, device=self.device, dtype=dtype).normal_(0.0, self.std, generator=gen)
        return whole if part is None else whole[part_index(part, len(shape))].contiguous()


def _tensor_files(directory: Path) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it."""
    index = directory / INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    raise FileNotFoundError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}: only safetensors checkpoints are read")


def checkpoint_directory(source: str, revision: str | None = None) -> Path:
    """A local model directory for `source`: the directory itself, or the hub snapshot of a repo id
    (weights, configs and tokenizer files only). Offline, a missing snapshot fails at once."""
    path = Path(source)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; all mean "not available"
        hint = ("HF_HUB_OFFLINE=1 is set and the model is not in the local hub cache"
                if os.environ.get("HF_HUB_OFFLINE") == "1" else "check the id, the network and HF_TOKEN")
        raise OSError(f"could not get {source!r} from the hub ({hint}); or pass a local directory: {exc}") from exc
