"""MLX backend (mlx-lm): Apple Silicon's GPU, or mlx[cpu] on Linux (slow, but the same numerics path)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from shared.settings import Settings

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


class MLXRunner:
    def __init__(self, model: Any, context_length: int) -> None:
        self.model = model
        self.context_length = context_length

    def new_cache(self) -> list[Any]:
        return make_prompt_cache(self.model)

    def forward(self, cache: list[Any], token_ids: Sequence[int]) -> np.ndarray:
        logits = self.model(mx.array([list(token_ids)]), cache=cache)[0, -1]  # (vocab,)
        return np.array(logits.astype(mx.float32))


class MLXBackend:
    name = "mlx"

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def load(self, model_dir: Path) -> MLXRunner:
        model, config = load_model(Path(model_dir))
        model.set_dtype(_DTYPES[self.dtype])
        return MLXRunner(model, int(config.get("max_position_embeddings", 2048)))


def create(name: str, settings: Settings) -> MLXBackend:
    """MLX in the dtype asked for; float32 by default, which matches torch CPU token for token."""
    return MLXBackend("float32" if settings.dtype == "auto" else settings.dtype)
