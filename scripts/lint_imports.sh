#!/usr/bin/env bash
# Check the import contracts of pyproject.toml ([tool.importlinter]) with lint-imports.
# grimp finds a package's modules by walking its folder, and backends/ and shaders/ live outside
# paged_attention/ (pyproject's package-dir mapping), so the check runs on a copy laid out as the
# installed package is: paged_attention/ with backends/ and shaders/ inside it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/paged_attention"
cp -R paged_attention/. "$stage/paged_attention/"
cp -R backends "$stage/paged_attention/backends"
cp -R shaders "$stage/paged_attention/shaders"
find "$stage" -name __pycache__ -prune -exec rm -rf {} +
root=$PWD
# From inside the copy: lint-imports puts the working folder first on sys.path.
cd "$stage" && PYTHONPATH="$stage" "$root/$VENV/bin/lint-imports" --config "$root/pyproject.toml" --no-cache "$@"
