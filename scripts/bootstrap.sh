#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with a Python >= 3.12.
# Prints nothing but errors when the environment is already up to date.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.easgate-installed"

ok_python() {  # is "$1" a Python >= 3.12?
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local c
    # 1. explicit choice; 2. what .python-version selects (pyenv and friends read it);
    # 3. versioned names on PATH; 4. any pyenv-installed 3.12+.
    for c in "${EASGATE_PYTHON:-}" python3 python3.13 python3.12 python; do
        [ -n "$c" ] || continue
        if command -v "$c" >/dev/null 2>&1 && ok_python "$c"; then command -v "$c"; return 0; fi
    done
    local pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
    for c in $(ls -d "$pyenv_root"/versions/3.* 2>/dev/null | sort -V -r); do
        if [ -x "$c/bin/python3" ] && ok_python "$c/bin/python3"; then echo "$c/bin/python3"; return 0; fi
    done
    return 1
}

if [ ! -x "$venv/bin/python" ] || ! ok_python "$venv/bin/python"; then
    cd "$root"   # so that .python-version is seen
    if ! py=$(find_python); then
        echo "easgate needs Python 3.12 or newer (mitmproxy 12 requires it) and none was found." >&2
        echo "Install one, e.g. 'pyenv install 3.12', 'apt-get install python3.12 python3.12-venv'," >&2
        echo "or 'brew install python@3.12', or point EASGATE_PYTHON at its interpreter." >&2
        exit 1
    fi
    echo "creating .venv with $py ($("$py" -V 2>&1))" >&2
    rm -rf "$venv"
    "$py" -m venv "$venv"
fi

if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/constraints.txt" -nt "$stamp" ]; then
    echo "installing easgate and its dependencies into .venv" >&2
    log="$venv/install.log"
    if ! { "$venv/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
           "$venv/bin/python" -m pip install --disable-pip-version-check -c "$root/constraints.txt" -e "$root[test]"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "installing into .venv failed; the whole log is in $log" >&2
        exit 1
    fi
    touch "$stamp"
fi
