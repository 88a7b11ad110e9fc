from __future__ import annotations

import numpy as np

from shared.catalog import ModelCatalog


def test_embeddings_are_384_dim_unit_vectors_that_rank_paraphrases_first(catalog: ModelCatalog) -> None:
    model = catalog.embedding("default")
    vectors = model.embed(
        [
            "A man is playing a guitar.",
            "Someone is strumming a guitar.",
            "The central bank raised interest rates again.",
        ]
    )
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    paraphrase = float(vectors[0] @ vectors[1])
    unrelated = float(vectors[0] @ vectors[2])
    assert paraphrase > 0.6 > unrelated


def test_token_counts_include_the_special_tokens(catalog: ModelCatalog) -> None:
    model = catalog.embedding("default")
    assert model.count_tokens(["hello world"]) == 4  # [CLS] hello world [SEP]
    assert model.count_tokens(["hello world", "hi"]) == 7
