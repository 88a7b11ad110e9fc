"""The CPUs prebuilt kernels are compiled for, and the choice among them before numba's import."""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path

import pytest

from shared.backends.targets import LEVELS, MANIFEST, Target, TargetError, choose, host_features, write_manifest
from shared.errors import BackendUnavailableError

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the targets are x86-64 levels")

BASELINE = Target("x86-64-v2")  # what every x86-64 host of this century runs
# A feature this host lacks (the first of a few that few CPUs have): a target that needs it must not be taken.
LACKED = next(
    f for f in ("amx-fp16", "avx512fp16", "amx-tile", "avx512vp2intersect", "avx512bf16") if not host_features().get(f)
)
UNRUNNABLE, RUNNABLE = Target("x86-64-v2", f"+{LACKED}"), Target("x86-64-v2", "+popcnt")


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A start as an image's: numba not imported yet, the environment naming the baseline; os.environ restored."""
    monkeypatch.delitem(sys.modules, "numba", raising=False)
    for name, value in BASELINE.environment().items():
        monkeypatch.setenv(name, value)
    return os.environ  # type: ignore[return-value]


def test_a_target_is_a_level_and_features_on_top() -> None:
    target = Target.parse("x86-64-v4+avx512vnni")
    assert target.environment() == {"NUMBA_CPU_NAME": "x86-64-v4", "NUMBA_CPU_FEATURES": "+avx512vnni"}
    assert target.name == "x86-64-v4+avx512vnni" and Target.parse("x86-64-v3").features == ""
    assert {"avx2", "fma", "avx512bw", "avx512vnni"} <= set(target.requires())
    for wrong in ("cascadelake", "x86-64-v4+", "x86-64-v5", "x86-64-v4++avx512vnni", ""):
        with pytest.raises(TargetError, match="x86-64 level"):
            Target.parse(wrong)


def test_every_feature_a_level_needs_is_one_llvm_names() -> None:
    """A misspelt feature would never be found on a host, and its level never chosen."""
    known = host_features()
    assert [f for features in LEVELS.values() for f in features if f not in known] == []
    assert all(known[f] for f in LEVELS["x86-64-v2"])  # and this host runs the baseline the tests use


def test_a_start_takes_the_first_listed_target_this_cpu_runs(
    tmp_path: Path, environment: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    write_manifest(tmp_path, BASELINE, [UNRUNNABLE, RUNNABLE])
    with caplog.at_level(logging.INFO):
        assert choose(tmp_path) == RUNNABLE
    assert environment["NUMBA_CPU_FEATURES"] == "+popcnt" and "compiled for x86-64-v2+popcnt" in caplog.text
    write_manifest(tmp_path, BASELINE, [UNRUNNABLE])
    environment.update(BASELINE.environment())
    assert choose(tmp_path) == BASELINE and environment["NUMBA_CPU_FEATURES"] == ""  # none runs: the baseline's


def test_a_named_target_is_taken_on_every_host_or_refused(tmp_path: Path, environment: dict[str, str]) -> None:
    write_manifest(tmp_path, BASELINE, [UNRUNNABLE, RUNNABLE])
    assert choose(tmp_path, "x86-64-v2") == BASELINE and environment["NUMBA_CPU_FEATURES"] == ""
    assert choose(tmp_path, "x86-64-v2+popcnt") == RUNNABLE
    environment.update(BASELINE.environment())  # the next start's
    with pytest.raises(BackendUnavailableError, match=f"this CPU lacks {LACKED}"):
        choose(tmp_path, UNRUNNABLE.name)
    with pytest.raises(BackendUnavailableError, match="prebuilt kernels are for x86-64-v2, "):
        choose(tmp_path, "x86-64-v4")
    with pytest.raises(BackendUnavailableError, match="no list of prebuilt kernels"):
        choose(tmp_path / "elsewhere", "x86-64-v2")
    assert choose(tmp_path / "elsewhere") is None  # nothing prebuilt: numba compiles for the host, as without


def test_the_environments_own_cpu_and_an_imported_numba_are_left_alone(
    tmp_path: Path, environment: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    write_manifest(tmp_path, BASELINE, [RUNNABLE])
    environment["NUMBA_CPU_NAME"] = "x86-64-v3"  # a user's choice, not the baseline the kernels were built beside
    assert choose(tmp_path) is None and environment["NUMBA_CPU_NAME"] == "x86-64-v3"
    environment.update(BASELINE.environment())
    sys.modules["numba"] = sys  # imported already: it has read its CPU
    with caplog.at_level(logging.WARNING):
        assert choose(tmp_path) is None
    assert environment["NUMBA_CPU_FEATURES"] == "" and "imported before its CPU was chosen" in caplog.text


def test_an_unreadable_list_leaves_numba_its_environments_cpu(
    tmp_path: Path, environment: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    for content in ("{", '{"format": 99}', '{"format": 1, "baseline": {}}', "[]"):
        (tmp_path / MANIFEST).write_text(content)
        with caplog.at_level(logging.WARNING):
            assert choose(tmp_path) is None
        assert environment["NUMBA_CPU_FEATURES"] == "" and "cannot read" in caplog.text
        caplog.clear()


def test_a_later_load_in_the_process_keeps_the_choice_quietly(
    tmp_path: Path, environment: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    write_manifest(tmp_path, BASELINE, [RUNNABLE])
    assert choose(tmp_path) == RUNNABLE
    sys.modules["numba"] = sys  # imported by the first model's load
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert choose(tmp_path) == RUNNABLE and choose(tmp_path, RUNNABLE.name) == RUNNABLE
    assert caplog.text == ""
    with pytest.raises(BackendUnavailableError, match="NUMBA_CPU_NAME names another CPU"):
        choose(tmp_path, BASELINE.name)  # pinned, but the environment already runs another


def test_prepare_compiles_for_the_environments_cpu_not_the_prebuilt_choice(
    tmp_path: Path, environment: dict[str, str]
) -> None:
    """`fnserve prepare` over an image's cache compiles the kernels for the baseline the environment names (the
    next targets are compiled from what it compiled); a start takes its choice."""
    from shared.backends import select_backend
    from shared.settings import Settings

    (tmp_path / "kernels").mkdir()
    write_manifest(tmp_path / "kernels", BASELINE, [RUNNABLE])
    settings = Settings(cache_dir=tmp_path, backend="cpu")
    assert select_backend(settings, prebuilt_kernels=False).name == "cpu"
    assert Target.from_environment() == BASELINE
    sys.modules.pop("numba", None)  # as in a new process (the fixture puts it back)
    select_backend(settings)
    assert Target.from_environment() == RUNNABLE
