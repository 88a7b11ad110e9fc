from __future__ import annotations

import os
import subprocess
import sys

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
    assert model.token_counts(["hello world"]) == [4]  # [CLS] hello world [SEP]
    assert model.token_counts(["hello world", "hi", "word " * 600]) == [4, 3, 602]  # before truncation


def test_loading_an_embedding_model_leaves_the_hub_setting_of_the_process_alone() -> None:
    """It used to set HF_HUB_OFFLINE=1 for the whole process, so every later hub model load failed."""
    code = (
        "import os; from shared.catalog import ModelCatalog; from shared.settings import Settings; "
        "ModelCatalog(Settings(preload=[])).embedding('default'); print(os.environ.get('HF_HUB_OFFLINE'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
