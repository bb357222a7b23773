"""Shared test fixtures: small PCam-format directories written with PCamWriter."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from pcamlib.pcam import PCamWriter


def _pcam_arrays(n: int, seed: int, index_pixels: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, size=n, dtype=np.uint8)
    if index_pixels:
        rows = np.arange(n)
        images[:, 0, 0, 0] = rows % 256
        images[:, 0, 0, 1] = rows // 256 % 256
        labels = (rows % 2).astype(np.uint8)
    return images, labels


@pytest.fixture
def make_pcam_dir(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing PCam-format splits; returns the directory.

    ``make_pcam_dir({"train": 64, "valid": 32}, seed=0)`` writes random uint8 images and
    random labels. With ``index_pixels=True`` row ``r`` is identifiable: pixel
    ``[0, 0, 0]`` is ``r % 256``, pixel ``[0, 0, 1]`` is ``r // 256`` and the label is
    ``r % 2``. Each split uses its own seed (``seed + position``); ``root`` defaults to
    ``tmp_path / "pcam"``.
    """

    def make(
        sizes: Mapping[str, int] | None = None,
        seed: int = 0,
        *,
        index_pixels: bool = False,
        root: Path | None = None,
    ) -> Path:
        root = tmp_path / "pcam" if root is None else Path(root)
        for i, (split, n) in enumerate((sizes or {"train": 32}).items()):
            images, labels = _pcam_arrays(n, seed + i, index_pixels)
            with PCamWriter(root, split, n) as writer:
                writer.write(images, labels)
        return root

    return make


@pytest.fixture(scope="module")
def empty_weights_cache(tmp_path_factory):
    """Point the torch hub cache at an empty folder: no ImageNet weights anywhere."""
    hub = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "get_dir", lambda: str(hub))
        yield hub


def pytest_collection_modifyitems(session, config, items):
    """Run ``after_notebooks`` tests last: they read what nbval's notebook runs wrote."""
    late = [item for item in items if item.get_closest_marker("after_notebooks")]
    if late:
        items[:] = [item for item in items if item not in late] + late
