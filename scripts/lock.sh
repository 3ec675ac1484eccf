#!/usr/bin/env bash
# Regenerate constraints.txt: the exact versions of every package easgate and its tests install.
#
# A security gateway must install the same code every time: `pip install -c constraints.txt .`
# (docs/deployment.md) and scripts/bootstrap.sh both read this file. Run this script to take newer
# versions (within pyproject.toml's ranges), run `make test`, and commit both files together.
# It resolves in a throw-away venv, so what is already in .venv does not leak into the lock.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${EASGATE_PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check "$root[test]"
{
    echo "# Exact versions of easgate's runtime and test dependencies, resolved by scripts/lock.sh"
    echo "# with $("$tmp/venv/bin/python" -V). Install with: pip install -c constraints.txt ."
    "$tmp/venv/bin/python" -m pip freeze --disable-pip-version-check --all \
        | grep -v -i -E '^(easgate|pip|setuptools|wheel)[ =@]'
} >"$root/constraints.txt"
echo "wrote $root/constraints.txt ($(grep -vc '^#' "$root/constraints.txt") packages)" >&2
