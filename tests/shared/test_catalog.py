from __future__ import annotations

import subprocess
import sys

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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_loading_a_model_gives_the_heap_it_freed_back_to_the_system(catalog: ModelCatalog) -> None:
    """Parsing Gemma 3's 33 MB tokenizer.json leaves its parse tree freed in the heap; glibc kept ~300 MB of it
    resident. Each process loads Gemma through a catalog and reports its resident memory, one with the release
    made a no-op."""
    catalog.generation("gemma-3-270m")  # converted (once) here, so both processes only load it
    code = (
        "import sys, shared.catalog as c\n"
        "if sys.argv[1] == 'kept': c.release_freed_heap = lambda: None\n"
        "from shared.settings import Settings\n"
        "c.ModelCatalog(Settings(preload=[], max_model_len=2048)).generation('gemma-3-270m')\n"
        "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmRSS')))\n"
    )

    def resident_kb(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    released, kept = resident_kb("released"), resident_kb("kept")
    assert kept - released > 150_000, (released, kept)
