"""Text embeddings through fastembed (ONNX Runtime): mean-pooled, L2-normalised vectors."""

from __future__ import annotations

from collections.abc import Iterator
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
        # 512 tokens of text span far fewer characters than this (a WordPiece token is at most 100 characters,
        # and a longer word is one [UNK]); only a text of giant unbroken words would read differently.
        self.max_chars = self.max_tokens * 64
        # A batch is padded to its longest text, and attention takes batch x 512 x 512 floats a head: long texts
        # go a few at a time (64 texts of 512 tokens took 5 GB), short ones still 64 at a time.
        self.max_group_chars = 16 * 1024
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.vocab_size = int(self._tokenizer.get_vocab_size())  # token ids an input may hold: 0 .. vocab_size - 1
        self.dimensions = int(self.embed(["dimension probe"]).shape[1])

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dimensions) float32, each row of unit length.

        Texts are cut to max_chars first. The model reads only their first 512 tokens, but the tokenizer
        would encode a whole megabyte of text before truncating: 64 such texts took gigabytes.
        """
        texts = [t[: self.max_chars] for t in texts]
        vectors: list[np.ndarray] = []
        for group in _groups(texts, batch_size, self.max_group_chars):
            vectors.extend(self._model.embed(group, batch_size=len(group)))
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Each text's length in tokens before truncation (special tokens included)."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts)]

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=True))


def _groups(texts: list[str], max_items: int, max_chars: int) -> Iterator[list[str]]:
    """Consecutive texts, at most max_items a group and, past the first text, at most max_chars together."""
    group: list[str] = []
    chars = 0
    for text in texts:
        if group and (len(group) == max_items or chars + len(text) > max_chars):
            yield group
            group, chars = [], 0
        group.append(text)
        chars += len(text)
    if group:
        yield group
