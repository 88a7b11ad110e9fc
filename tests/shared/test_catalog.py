from __future__ import annotations

import pytest

from shared.catalog import ModelCatalog
from shared.errors import InvalidRequestError, ModelNotFoundError
from shared.settings import Settings


def test_default_alias_means_the_default_model_of_each_kind(catalog: ModelCatalog) -> None:
    assert catalog.resolve("default", "generate").id == "smollm2-135m-instruct"
    assert catalog.resolve("default", "embedding").id == "all-minilm-l6-v2"


def test_unknown_model_is_not_found_and_lists_what_exists(catalog: ModelCatalog) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        catalog.resolve("gpt-9", "generate")
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    assert "smollm2-135m-instruct" in err.value.message


def test_a_model_of_the_wrong_kind_is_a_bad_request(catalog: ModelCatalog) -> None:
    with pytest.raises(InvalidRequestError):
        catalog.resolve("all-minilm-l6-v2", "generate")


def test_models_load_lazily_and_once() -> None:
    catalog = ModelCatalog(Settings(preload=[]))
    assert not catalog.is_loaded("gemma-3-270m")
    assert not catalog.is_loaded("smollm2-135m-instruct")
    first = catalog.generation("default")
    assert catalog.is_loaded("smollm2-135m-instruct") and not catalog.is_loaded("gemma-3-270m")
    assert catalog.generation("smollm2-135m-instruct") is first
    catalog.close()
