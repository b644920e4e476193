"""Shared test fixtures: the project's own tiny checkpoints and their float GGUFs, built once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_dir() -> Callable[[str], Path]:
    """``model_dir("tiny-tied")`` -> a checkpoint directory built (once, cached) by qconvert.fixtures."""
    from qconvert.fixtures.models import fixture_path

    return fixture_path


@pytest.fixture(scope="session")
def float_gguf(model_dir, tmp_path_factory) -> Callable[[str, str], Path]:
    """``float_gguf("tiny-tied", "BF16")`` -> qconvert's float GGUF of a fixture, written once per session."""
    from qconvert.gguf.export import export_gguf

    made: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("float-gguf")

    def get(name: str, preset: str = "BF16") -> Path:
        if (name, preset) not in made:
            path = root / f"{name}-{preset.lower()}.gguf"
            export_gguf(model_dir(name), path, preset, model_name=f"qconvert/{name}")
            made[name, preset] = path
        return made[name, preset]

    return get


@pytest.fixture(scope="session")
def calib_txt(tmp_path_factory) -> Path:
    """The demo model's own training distribution as a local .txt calibration file.

    The built-in calibration set is natural multilingual text, far from what the tiny demo was trained on; tests
    whose contract is "calibration helps" calibrate the demo on its own distribution, as a user would.
    """
    from qconvert.fixtures.corpus import training_text

    path = tmp_path_factory.mktemp("calib") / "train.txt"
    path.write_text(training_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-tensor tests (the machine is shared); use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def ct():
    """The compressed-tensors package (the oracle of the compressed-tensors layouts), or a skip saying how to get it."""
    return pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed: "
                               "pip install compressed-tensors==0.20.0 (see constraints.txt)")
