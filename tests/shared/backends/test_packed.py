"""Packed weights kept between starts: the same bits, mapped not packed, and a damaged file packed again."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.backends import llama
from shared.backends.cpu_runner import CpuRunner
from shared.backends.kernels.isa import dot_kernels
from shared.backends.llama_config import LlamaConfig
from shared.backends.projections import Linear, dense_dtype
from shared.catalog import ModelCatalog
from tests.shared.backends.test_conformance import model_dir
from tests.shared.backends.test_llama import smol


def test_packed_weights_kept_from_one_start_give_the_same_bits_at_the_next(
    catalog: ModelCatalog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`auto` packs SmolLM2 to int4 once and keeps it; the next start maps that file (no check, no packing) and
    computes the same logits, bit for bit. A damaged file is packed and written again."""

    def start() -> CpuRunner:
        return smol(catalog, torch.float32, "auto", 4, 64, packed_dir=tmp_path)

    def logits(runner: CpuRunner) -> np.ndarray:
        runner.prefill(1, [1, 504, 3459, 282, 4649, 314], 0)
        return runner.decode([28, 46, 9], [6, 0, 0])

    caplog.set_level("INFO")
    first = start()
    (saved,) = tmp_path.glob("*.safetensors")
    assert "loaded packed weights" not in caplog.text
    caplog.clear()
    os.utime(saved, (0, 0))
    again = start()
    assert "loaded packed weights" in caplog.text and "quantization auto" not in caplog.text
    assert time.time() - saved.stat().st_mtime < 600  # a read marks it in use (another torch's prune spares it)
    assert again.quantization == first.quantization == ("int4-a8" if dot_kernels() else "int4")
    assert any(str(saved) in line for line in open("/proc/self/maps"))  # mapped, not copied
    np.testing.assert_array_equal(logits(again), logits(first))

    saved.write_bytes(saved.read_bytes()[:1000])  # cut short, as by a full disk
    caplog.clear()
    damaged = start()
    assert "ignoring the packed weights" in caplog.text
    np.testing.assert_array_equal(logits(damaged), logits(first))
    caplog.clear()
    start()
    assert "loaded packed weights" in caplog.text  # written anew


def test_auto_remembers_a_checkpoint_that_is_not_4_bit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A float checkpoint stays as stored under `auto`; the check runs once, and the mark it leaves holds no
    weights (the model's own file is what the kernels read)."""
    from tests.shared.backends.test_llama_configs import tiny_model

    model = tmp_path / "model"
    tiny_model(model)
    config = LlamaConfig.from_dir(model)
    assert config is not None
    caplog.set_level("INFO")
    for _ in range(2):
        runner = llama.runner(
            model, config, dtype=torch.float32, quantization="auto", slots=1, max_len=32, packed_dir=tmp_path / "p"
        )
        assert runner.quantization == "none"
    assert caplog.text.count("quantization auto: none") == 1
    (mark,) = (tmp_path / "p").glob("*.safetensors")
    assert mark.stat().st_size < 1024


def test_files_another_version_made_are_removed_once_unused_for_a_week_and_other_settings_kept(
    catalog: ModelCatalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new file replaces this model's files of another format or torch once no start has read them for a week
    (another install sharing the cache may read its own); a file of other settings (another dtype) stays."""
    from shared.backends import packed
    from shared.backends.llama import Embedding, Linear, Weights

    path = model_dir(catalog)
    row = torch.zeros(1, 32)
    mark = Weights("none", Embedding(row, torch.float32, None), Linear(row, torch.float32, "none"), row[0], [])
    current = packed.PACK_FORMAT
    monkeypatch.setattr(packed, "PACK_FORMAT", current - 1)
    earlier = packed.PackedWeights(tmp_path, path, "auto", "float32")
    earlier.save(mark)
    monkeypatch.setattr(packed, "PACK_FORMAT", current)
    other = packed.PackedWeights(tmp_path, path, "auto", "bfloat16")
    other.save(mark)
    assert earlier.path.exists() and other.path.exists()  # just written: maybe another install's, kept
    week = time.time() - packed.UNUSED_FOR - 60
    os.utime(earlier.path, (week, week))
    now = packed.PackedWeights(tmp_path, path, "auto", "float32")
    now.save(mark)
    assert sorted(tmp_path.iterdir()) == sorted([other.path, now.path])
    assert now.quantization() == other.quantization() == "none"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_checkpoint_kept_as_stored_per_projection_is_mapped_with_its_kinds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, dtype: torch.dtype
) -> None:
    """Weights of several GGUF kinds (as Gemma's Q4_K_M): Q8_0 and Q5_0 projections and a Q8_0 embedding run on
    the 8-bit kernel as stored, Q4_K ones on the 8-bit input kernel with their own groups, float ones dense. The
    next start reads that mix back from the packed file, each
    projection on its kind, and computes the same logits (float32's one-row products too, whatever offset the
    file maps them at); a file it cannot read is packed again under auto's own choice, never another."""
    import gguf
    from safetensors.torch import load_file, save_file

    from shared.backends.cpu_runner import DotLinear
    from tests.shared.backends.test_llama_configs import tiny_model
    from tests.shared.backends.test_projections import q4k_like

    if not dot_kernels():
        pytest.skip("the 8-bit kernel needs AVX2 or AVX-512 VNNI")
    model = tmp_path / "model"
    tiny_model(model, hidden_size=64, intermediate_size=256)
    weights = load_file(str(model / "model.safetensors"))
    for key in [k for k in weights if "down_proj.weight" in k]:
        weights[key] = q4k_like(weights[key])
    for name, kind in (("embed_tokens", "Q8_0"), ("q_proj", "Q5_0"), ("k_proj", "Q8_0"), ("v_proj", "Q5_0")):
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        for key in [k for k in weights if f"{name}.weight" in k]:
            blocks = gguf.quants.quantize(weights[key].numpy(), qtype)
            weights[key] = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).astype(np.float32))
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    config = LlamaConfig.from_dir(model)
    assert config is not None

    cpu = torch.device("cpu")

    def start() -> tuple[CpuRunner, np.ndarray]:
        runner = llama.runner(
            model, config, dtype=dtype, quantization="auto", slots=2, max_len=32, packed_dir=tmp_path / "p"
        )
        assert isinstance(runner, CpuRunner)
        layer = runner.layers[0]
        assert isinstance(layer.qkv, DotLinear) and layer.qkv.kind == "int8-groups"
        assert isinstance(layer.down, DotLinear) and layer.down.kind == "int4-a8"
        assert isinstance(layer.o, llama.TorchProjection) and not isinstance(layer.gate_up, DotLinear)
        assert isinstance(layer.o.linear, Linear) and layer.o.linear.dtype == dense_dtype(dtype, cpu)
        return runner, runner.prefill(0, [5, 17, 3, 88, 42], 0)

    caplog.set_level("INFO")
    _, first = start()
    dense = str(dense_dtype(dtype, cpu)).removeprefix("torch.")  # float32 for bfloat16 on AVX2
    assert f"as stored, per projection (2 4-bit groups, 2 8-bit groups, 4 {dense};" in caplog.text
    caplog.clear()
    _, again = start()
    assert "loaded packed weights" in caplog.text and "quantization auto" not in caplog.text
    np.testing.assert_array_equal(again, first)
    (saved,) = (tmp_path / "p").glob("*.safetensors")
    saved.write_bytes(saved.read_bytes()[:-64])  # cut short
    caplog.clear()
    _, repacked = start()
    assert "ignoring the packed weights" in caplog.text and "as stored, per projection" in caplog.text
    np.testing.assert_array_equal(repacked, first)
