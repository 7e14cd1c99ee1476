#!/usr/bin/env bash
# Creates .venv/ on first use and installs the project with its pinned
# dependencies; later calls reinstall only when setup.py changed.
#
# Which Python: PYTHON=... when given (a command or a path), else the Python
# an existing .venv was made with, else the newest supported one on PATH
# (python3.13, python3.12, python3.11, then python3). Supported: 3.11, 3.12
# and 3.13 (setup.py's python_requires); any other is refused. An existing
# .venv is never deleted: when PYTHON names another minor version than the
# .venv's, this stops and prints the command that recreates it.
# GBIF_EMBED_VENV=DIR uses another folder than .venv (CI's second Python).
# `scripts/setup_venv.sh --which` prints the chosen Python and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
SUPPORTED=(3.11 3.12 3.13)  # keep in step with python_requires in setup.py
VENV="${GBIF_EMBED_VENV:-.venv}"
me="scripts/setup_venv.sh"  # or ./run_local.sh, ./run_tests.sh, which call it

say() { echo "setup_venv: $*" >&2; }
fail() { echo "setup_venv: error: $*" >&2; exit 1; }
# The full version of a Python ("3.12.1"), or nothing when it does not run.
version_of() {
  "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null | head -n 1 || true
}
minor() { echo "$1" | cut -d. -f1,2; }
supported() {
  local v
  for v in "${SUPPORTED[@]}"; do [ "$v" = "$(minor "$1")" ] && return 0; done
  return 1
}
supported_list="${SUPPORTED[*]}"
supported_list="${supported_list// /, }"

venv_version=""
if [ -e "$VENV/bin/python" ] || [ -L "$VENV/bin/python" ]; then
  venv_version="$(version_of "$VENV/bin/python")"
  if [ -z "$venv_version" ]; then
    fail "$VENV/bin/python does not run (was the Python it was made with removed?). Recreate it: rm -rf $VENV && ${PYTHON:+PYTHON=$PYTHON }$me"
  fi
fi

if [ -n "${PYTHON:-}" ]; then
  command -v "$PYTHON" >/dev/null 2>&1 || fail "PYTHON=$PYTHON: no such command. gbif-embed supports Python $supported_list"
  version="$(version_of "$PYTHON")"
  [ -n "$version" ] || fail "PYTHON=$PYTHON does not run as a Python interpreter (a pyenv shim runs only for the pyenv versions selected: give the interpreter's path, e.g. PYTHON=\$(pyenv root)/versions/3.12.1/bin/python)"
  supported "$version" || fail "PYTHON=$PYTHON is Python $version; gbif-embed supports Python $supported_list only (setup.py python_requires). Install one of them and point PYTHON to it, e.g. PYTHON=python3.12 ./run_local.sh"
  if [ -n "$venv_version" ] && [ "$(minor "$venv_version")" != "$(minor "$version")" ]; then
    fail "$VENV was made with Python $venv_version, not Python $version (PYTHON=$PYTHON); it is left as it is. To recreate it with Python $(minor "$version"): rm -rf $VENV && PYTHON=$PYTHON $me (or keep both: GBIF_EMBED_VENV=$VENV-py$(minor "$version") PYTHON=$PYTHON $me)"
  fi
  python="$PYTHON" how="PYTHON=$PYTHON"
elif [ -n "$venv_version" ]; then
  supported "$venv_version" || fail "$VENV was made with Python $venv_version, which gbif-embed does not support (Python $supported_list). Recreate it: rm -rf $VENV && $me (or PYTHON=python3.12 $me)"
  python="$VENV/bin/python"
  version="$venv_version"
else
  python="" version=""
  for candidate in python3.13 python3.12 python3.11 python3; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    found="$(version_of "$candidate")"
    if [ -n "$found" ] && supported "$found"; then python="$candidate" version="$found"; break; fi
  done
  [ -n "$python" ] || fail "no supported Python found on PATH (looked for python3.13, python3.12, python3.11 and python3); gbif-embed supports Python $supported_list. Install one, or point PYTHON to it: PYTHON=/path/to/python3.12 $me"
fi

if [ "${1:-}" = "--which" ]; then
  echo "$python $version"
  exit 0
fi

if [ -n "$venv_version" ]; then
  say "using $VENV (Python $venv_version; Python $supported_list are supported, PYTHON=... with a new $VENV picks another)"
else
  say "creating $VENV with Python $version (${how:-$python, the newest supported Python on PATH; PYTHON=... picks another})"
  "$python" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum setup.py | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  if [ -n "$venv_version" ]; then
    say "setup.py changed since $VENV was installed: installing gbif-embed and its pinned dependencies again"
  else
    say "installing gbif-embed and its pinned dependencies into $VENV (a few minutes)"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
