"""Shared fixtures: the tiny random Llama every test uses, and the bundled SmolLM2 for the slow tests.

The whole suite runs offline: nothing may be downloaded.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

TESTS_DIR = Path(__file__).resolve().parent
for path in (TESTS_DIR.parent, TESTS_DIR):  # the repo (perpcs) and tests/tiny.py importable
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from tiny import build_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2 as an HF directory, converted once into a persistent cache shared by every test run."""
    from perpcs.models.loading import resolve_model_dir

    os.environ.setdefault("PERPCS_CACHE", str(Path.home() / ".cache" / "perpcs"))
    return resolve_model_dir("smollm2")
