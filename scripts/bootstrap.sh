#!/usr/bin/env bash
# Create .venv and install pfdiff (editable, with test extras) under constraints.txt.
# Idempotent: reinstalls only when pyproject.toml or constraints.txt changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${PFDIFF_VENV:-$root/.venv}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
stamp="$venv/.pfdiff-install-stamp"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import pfdiff" 2>/dev/null; then
  exit 0
fi
echo "[pfdiff] installing into $venv (first run takes a minute or two)..." >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >&2 || true
"$venv/bin/python" -m pip install -q -c constraints.txt -e ".[test]" >&2
echo "$want" > "$stamp"
