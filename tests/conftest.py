"""Shared fixtures: tiny random-weight checkpoints of every family, saved and reloaded for real."""

import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_holder import ModelHolder
from testing.tiny_models import FAMILIES, make_tiny_model

REPO = Path(__file__).resolve().parents[1]

_holders: dict[str, ModelHolder] = {}


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: make_tiny_model(family, root / family, seed=i) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def load_holder(tiny_model_dirs):
    """family -> ModelHolder loaded from its saved folder through the real loading path (cached)."""

    def load(family: str) -> ModelHolder:
        if family not in _holders:
            _holders[family] = ModelHolder.load(tiny_model_dirs[family], device="cpu", dtype="float32")
        return _holders[family]

    return load


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, for a test server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def dummy_image() -> Image.Image:
    return noise_image(150, 100)
