"""torch backends: CUDA (bfloat16 by default) and CPU (float32 by default). Device and dtype are decided here."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numba
import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from shared.backends.kernels import KERNELS_DIR, seed_cache
from shared.backends.llama import LlamaConfig, LlamaRunner, unsupported
from shared.settings import Settings

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TorchCache:
    """The transformers cache object for one sequence; None until the first forward."""

    past: Any = None
    length: int = 0


@dataclass
class TorchRunner:
    model: PreTrainedModel
    device: torch.device
    context_length: int

    def new_cache(self) -> TorchCache:
        return TorchCache()

    @torch.inference_mode()
    def forward(self, cache: TorchCache, token_ids: Sequence[int]) -> np.ndarray:
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)  # (1, T)
        out = self.model(input_ids=ids, past_key_values=cache.past, use_cache=True, logits_to_keep=1)
        cache.past = out.past_key_values
        cache.length += len(token_ids)
        return out.logits[0, -1].float().cpu().numpy()  # (vocab,)


class TorchBackend:
    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, settings: Settings) -> None:
        self.name = name
        self.device = device
        self._dtype = dtype
        self.dtype = str(dtype).removeprefix("torch.")
        self.settings = settings

    def load(self, model_dir: Path) -> TorchRunner | LlamaRunner:
        """The batched Llama runner where it applies (Llama family), else transformers' own model.

        On CPU the runner uses its numba kernels and the quantization asked for; on CUDA the torch ops path in
        the model dtype (bfloat16 by default), unquantized: the CPU's int4 and int8 kernels do not run there.
        """
        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)  # per thread under OpenMP: set here, on the thread the model runs on
            numba.set_num_threads(min(s.threads, numba.get_num_threads()))  # the attention kernel's
        if self.device.type == "cpu":
            seed_cache(s.cache_dir / KERNELS_DIR)  # an image's kernels, compiled when it was built
        config = LlamaConfig.from_dir(model_dir)
        if config is None and s.engine == "batched":
            raw = json.loads((model_dir / "config.json").read_text())
            log.info("the batched runner does not implement %s: serving with transformers' model", unsupported(raw))
        if config is not None and s.engine == "batched":
            cpu = self.device.type == "cpu"
            # Under auto, weights that stay unquantized (not 4-bit groups already: Gemma's Q4_K_M) are kept in
            # bfloat16 unless a dtype is named: more faithful than llama.cpp's own logits on the same GGUF and
            # ~3x faster than float32 (docs/engine.md). Exact float32 is quantization "none".
            dense = torch.bfloat16 if cpu and s.quantization == "auto" and s.dtype == "auto" else self._dtype
            return LlamaRunner(
                model_dir,
                config,
                dtype=dense,
                quantization=s.quantization if cpu else "none",
                slots=s.max_running + s.prefix_cache_slots,
                max_len=s.max_model_len or min(2048, config.max_position_embeddings),
                device=self.device,
                packed_dir=s.cache_dir / "packed",
            )
        from transformers import AutoModelForCausalLM  # 1.7 s of imports the batched runner never needs

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self._dtype)
        model.to(self.device).eval()  # type: ignore[arg-type]  # transformers types .to oddly
        return TorchRunner(model=model, device=self.device, context_length=_context_length(model.config))


def _context_length(config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(value := getattr(config, key, None), int):
            return value
    return 2048


def create(name: str, settings: Settings) -> TorchBackend:
    """The CPU or CUDA backend with the dtype the settings ask for."""
    device = torch.device("cuda" if name == "cuda" else "cpu")
    dtype_name = settings.dtype if settings.dtype != "auto" else ("bfloat16" if name == "cuda" else "float32")
    return TorchBackend(name, device, _DTYPES[dtype_name], settings)
