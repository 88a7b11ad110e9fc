"""torch backends: CUDA (bfloat16 by default) and CPU (float32 by default). Device and dtype are decided here.

torch itself is imported only where a model needs it: the CPU runner over weights packed for its numba kernels
(shared.backends.cpu_runner) never does, which is ~1.5 s and ~175 MB of a function's cold start.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numba
import numpy as np

from shared.backends import cpu_runner
from shared.backends.kernels.cache import seed_cache
from shared.backends.llama_config import LlamaConfig, unsupported
from shared.backends.targets import KERNELS_DIR
from shared.settings import Settings

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from shared.backends.llama import LlamaRunner

log = logging.getLogger(__name__)


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

    def forward(self, cache: TorchCache, token_ids: Sequence[int]) -> np.ndarray:
        import torch

        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)  # (1, T)
        with torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=cache.past, use_cache=True, logits_to_keep=1)
        cache.past = out.past_key_values
        cache.length += len(token_ids)
        return out.logits[0, -1].float().cpu().numpy()  # (vocab,)


class TorchBackend:
    compute_thread = True  # torch's and numba's OpenMP teams: one thread starts parallel work

    def __init__(self, name: str, dtype: str, settings: Settings) -> None:
        self.name = name
        self.device_type = "cuda" if name == "cuda" else "cpu"
        self.dtype = dtype  # the name of a torch dtype: float32, bfloat16
        self.settings = settings

    def load(self, model_dir: Path) -> TorchRunner | LlamaRunner | cpu_runner.CpuRunner:
        """The batched Llama runner where it applies (Llama family), else transformers' own model.

        On CPU the runner uses its numba kernels and the quantization asked for; on CUDA the torch ops path in
        the model dtype (bfloat16 by default), unquantized: the CPU's int4 and int8 kernels do not run there.
        """
        s = self.settings
        cpu = self.device_type == "cpu"
        if s.threads:
            numba.set_num_threads(min(s.threads, numba.get_num_threads()))  # the attention kernel's
        if cpu:
            seed_cache(s.cache_dir / KERNELS_DIR)  # an image's kernels, compiled when it was built
        config = LlamaConfig.from_dir(model_dir)
        if config is None and s.engine == "batched":
            raw = json.loads((model_dir / "config.json").read_text())
            log.info("the batched runner does not implement %s: serving with transformers' model", unsupported(raw))
        batched = config is not None and s.engine == "batched"
        slots = s.max_running + s.prefix_cache_slots
        max_len = s.max_model_len or min(2048, config.max_position_embeddings if config else 2048)
        if config is not None and batched and cpu:
            # Under auto, weights that stay unquantized (not 4-bit groups already: Gemma's Q4_K_M) are kept in
            # bfloat16 unless a dtype is named: more faithful than llama.cpp's own logits on the same GGUF and
            # ~3x faster than float32 (docs/engine.md); among quantized ones, float32 for several rows where torch
            # has no bfloat16 oneDNN (projections.dense_stored). Exact float32 is quantization "none".
            dense = "bfloat16" if s.quantization == "auto" and s.dtype == "auto" else self.dtype
            return cpu_runner.load(
                model_dir,
                config,
                dtype=dense,
                quantization=s.quantization,
                slots=slots,
                max_len=max_len,
                packed_dir=s.cache_dir / "packed",
                threads=s.threads,
            )
        import torch

        if s.threads:
            torch.set_num_threads(s.threads)  # per thread under OpenMP: set here, on the thread the model runs on
        device, dtype = torch.device(self.device_type), getattr(torch, self.dtype)
        if config is not None and batched:
            from shared.backends.llama import LlamaRunner

            return LlamaRunner(
                model_dir,
                config,
                dtype=dtype,
                quantization="none",
                slots=slots,
                max_len=max_len,
                device=device,
                graphs=s.cuda_graphs,
            )
        from transformers import AutoModelForCausalLM  # 1.7 s of imports the batched runner never needs

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.to(device).eval()  # type: ignore[arg-type]  # transformers types .to oddly
        return TorchRunner(model=model, device=device, context_length=_context_length(model.config))


def _context_length(config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(value := getattr(config, key, None), int):
            return value
    return 2048


def create(name: str, settings: Settings) -> TorchBackend:
    """The CPU or CUDA backend with the dtype the settings ask for."""
    dtype = settings.dtype if settings.dtype != "auto" else ("bfloat16" if name == "cuda" else "float32")
    return TorchBackend(name, dtype, settings)
