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

# Real LaMP users (CC BY-NC-SA 4.0): read where they are, never copied into the repository. A checkout has
# shared/ beside it (CI clones the repository next to a copy of shared/); PERPCS_LAMP_REAL points elsewhere.
LAMP_REAL_ENV = "PERPCS_LAMP_REAL"


def lamp_real_path() -> Path:
    """Where the real LaMP folder is looked for: $PERPCS_LAMP_REAL, else <repo>/../shared/lamp_real."""
    override = os.environ.get(LAMP_REAL_ENV)
    return Path(override) if override else TESTS_DIR.parent.parent / "shared" / "lamp_real"


def lamp_real_missing(*parts: str) -> str:
    """Why the tests on real LaMP data cannot run ('' when the folder, or the path inside it, is there)."""
    path = lamp_real_path().joinpath(*parts)
    if path.exists():
        return ""
    return (f"real LaMP data not found at {path} (the shared/lamp_real folder beside the checkout, or "
            f"${LAMP_REAL_ENV}; CC BY-NC-SA 4.0, never copied into the repository)")


def require_lamp_real(*parts: str) -> Path:
    """The real LaMP folder (or a path inside it); skips the calling test, saying why, when it is absent."""
    reason = lamp_real_missing(*parts)
    if reason:
        pytest.skip(reason)
    return lamp_real_path().joinpath(*parts)


@pytest.fixture
def lamp_real_dir() -> Path:
    """The real LaMP folder (LaMP_1/, LaMP_2N/, SOURCES.md); the test is skipped when it is absent."""
    return require_lamp_real()


@pytest.fixture
def lamp2_full_rows(lamp_real_dir) -> list:
    """The five real LaMP-2 (news) questions of LaMP_2N/lamp2_full.jsonl (no golds; see SOURCES.md there)."""
    import json
    path = require_lamp_real("LaMP_2N", "lamp2_full.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2 as an HF directory, converted once into a persistent cache shared by every test run."""
    from perpcs.models.loading import resolve_model_dir

    os.environ.setdefault("PERPCS_CACHE", str(Path.home() / ".cache" / "perpcs"))
    return resolve_model_dir("smollm2")
