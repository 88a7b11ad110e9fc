from __future__ import annotations

import importlib.util

import pytest

from shared.backends import REGISTRY, select_backend
from shared.errors import BackendUnavailableError
from shared.settings import Settings

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is installed wherever the suite runs
    HAS_CUDA = False


def test_registry_order_is_mlx_then_cuda_then_cpu() -> None:
    assert [e.name for e in REGISTRY] == ["mlx", "cuda", "cpu"]


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA, which auto prefers")
def test_auto_picks_torch_cpu_on_a_linux_machine_without_gpu() -> None:
    backend = select_backend(Settings(backend="auto"))
    assert backend.name == "cpu"
    assert backend.dtype == "float32"


def test_dtype_setting_reaches_the_backend() -> None:
    assert select_backend(Settings(backend="cpu", dtype="bfloat16")).dtype == "bfloat16"


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU")
def test_a_named_backend_that_cannot_run_is_an_error_not_a_fallback() -> None:
    with pytest.raises(BackendUnavailableError) as err:
        select_backend(Settings(backend="cuda"))
    assert "cuda" in err.value.message and "no CUDA device" in err.value.message


@pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None, reason="mlx-lm is not installed")
def test_mlx_can_be_named_explicitly_where_installed() -> None:
    assert select_backend(Settings(backend="mlx")).name == "mlx"
