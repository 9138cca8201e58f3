#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the pure-Python packages the lent GPU machine lacks for bench/gpu_session.sh's
# tests: rank-bm25, nltk and rouge-score (an sdist on PyPI, built into a wheel here). Versions from
# requirements.txt; nltk is rouge-score's dependency. Needs the package registry, so it runs here, not there.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
pin() { grep -i "^$1==" requirements.txt | cut -d= -f3; }
rm -rf .whl && mkdir .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform any -d .whl "rank-bm25==$(pin rank-bm25)" "nltk==${NLTK_VERSION:-3.10.4}"
$PY -m pip wheel -q --no-deps -w .whl "rouge-score==$(pin rouge-score)"
ls -l .whl
