"""Session fixtures: the two small DeepSeek-V2 checkpoints, built once on disk and loaded through
transformers like any user model (loaded with -p tests.model_fixtures, see pyproject)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvsplice.checkpoints import build_small_checkpoint

VARIANTS = ("lite", "qlora")


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {v: str(build_small_checkpoint(root / v, variant=v, seed=0)) for v in VARIANTS}


def load(path: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(params=VARIANTS)
def variant_model(request, checkpoint_dirs):
    """(variant, path, model, tokenizer), freshly loaded for each test (tests patch models)."""
    path = checkpoint_dirs[request.param]
    model, tokenizer = load(path)
    return request.param, path, model, tokenizer


@pytest.fixture
def lite_model(checkpoint_dirs):
    return load(checkpoint_dirs["lite"])
