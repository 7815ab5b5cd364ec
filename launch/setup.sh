#!/usr/bin/env bash
# Creates ./.venv with Python >= 3.12 and installs ultralong-jax into it.
#   bash launch/setup.sh          runtime dependencies (requirements.txt)
#   bash launch/setup.sh --test   plus test dependencies (requirements-test.txt: pytest, torch, transformers,
#                                 and the optional extras the tests exercise, e.g. requirements-tfds.txt)
# Re-running is cheap: pip runs only when the requirements files changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

reqs=requirements.txt
[[ "${1:-}" == "--test" ]] && reqs=requirements-test.txt

ok_python() {  # prints the interpreter path if it runs and is >= 3.12
  "$@" -c 'import sys; assert sys.version_info >= (3, 12); print(sys.executable)' 2>/dev/null
}

find_python() {
  local cand
  for cand in python3.13 python3.12 python3; do
    command -v "$cand" >/dev/null 2>&1 && ok_python "$cand" && return 0
  done
  # pyenv: a bare python3.12 shim fails when pyenv's global is older; ask for the version explicitly.
  if command -v pyenv >/dev/null 2>&1; then
    local root version
    root=$(pyenv root)
    for version in $(ls -1 "$root/versions" 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.|$)' | sort -rV); do
      ok_python "$root/versions/$version/bin/python3" && return 0
    done
  fi
  for cand in /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9] "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3; do
    [[ -x "$cand" ]] && ok_python "$cand" && return 0
  done
  return 1
}

if [[ ! -x .venv/bin/python ]] || ! ok_python .venv/bin/python >/dev/null; then
  if ! py=$(find_python); then
    echo "error: ultralong-jax needs Python >= 3.12 (JAX >= 0.11 does) and none was found." >&2
    echo "       Tried python3.13, python3.12, python3, pyenv versions and /usr/{local/,}bin." >&2
    echo "       Install one (e.g. 'pyenv install 3.12') and run this again." >&2
    exit 1
  fi
  echo "setup: creating .venv with $py"
  rm -rf .venv
  "$py" -m venv .venv
fi

stamp=.venv/.ultralong-installed-$(basename "$reqs" .txt)
digest=$(cat requirements*.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$digest" ]]; then
  echo "setup: installing $reqs into .venv (first time: several minutes; torch alone is ~2 GB)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$reqs"
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$digest" > "$stamp"
fi
echo "setup: .venv ready ($(.venv/bin/python --version))"
