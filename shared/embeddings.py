"""Text embeddings through fastembed (ONNX Runtime): mean-pooled, L2-normalised vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# fastembed's base model id for the embedded files: it fixes pooling (mean) and normalisation.
_FASTEMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class EmbeddingModel:
    def __init__(self, model_id: str, model_dir: Path, threads: int | None = None) -> None:
        from fastembed import TextEmbedding
        from tokenizers import Tokenizer

        self.id = model_id
        self._model = TextEmbedding(
            model_name=_FASTEMBED_MODEL,
            specific_model_path=str(model_dir),
            model_file="model.onnx",
            threads=threads,
            local_files_only=True,  # the files are local; never reach for a hub (and leave the process's env alone)
        )
        self.max_tokens = 512  # the model reads this many tokens of an input, and truncates the rest
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.dimensions = int(self.embed(["dimension probe"]).shape[1])

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dimensions) float32, each row of unit length."""
        return np.asarray(list(self._model.embed(texts, batch_size=batch_size)), dtype=np.float32)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Each text's length in tokens before truncation (special tokens included)."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts)]

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=True))
