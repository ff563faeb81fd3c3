#!/usr/bin/env bash
# Run the test suite: `bash tests/run.sh [pytest args...]` from anywhere.
#
# Creates ./.venv (Python 3.11) on first use and installs requirements-test.txt
# plus requirements-test-nodeps.txt (--no-deps). The venv is reused while a
# stamp file (sha256 of the requirement files and the interpreter) matches;
# otherwise it is rebuilt from scratch. Force a rebuild with `rm -rf .venv`.
# Override the interpreter with PYTHON=/path/to/python3.11.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
STAMP="$VENV/.requirements.sha256"
REQ="requirements-test.txt"
REQ_NODEPS="requirements-test-nodeps.txt"

find_python() {
    local cand
    for cand in "${PYTHON:-}" /root/.pyenv/versions/3.11.7/bin/python3 \
        "$(command -v python3.11 || true)" "$(command -v python3 || true)"; do
        [ -n "$cand" ] && [ -x "$cand" ] || continue
        # pyenv shims can exist yet fail; require a working 3.11 with venv.
        if "$cand" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            echo "$cand"
            return 0
        fi
    done
    echo "tests/run.sh: no working Python 3.11 found (set PYTHON=...)" >&2
    return 1
}

wanted_stamp() {
    # Interpreter version + both requirement files: any change rebuilds the venv.
    {
        "$1" -c 'import sys; print(sys.version)'
        sha256sum "$REQ" "$REQ_NODEPS"
    } | sha256sum | cut -d' ' -f1
}

ensure_venv() {
    local py want
    if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] &&
        [ "$(cat "$STAMP")" = "$(wanted_stamp "$VENV/bin/python")" ]; then
        return 0
    fi
    py="$(find_python)"
    echo "== creating $VENV with $py ($("$py" --version 2>&1))"
    local t0=$SECONDS
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
    export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
    "$VENV/bin/python" -m pip install -r "$REQ"
    "$VENV/bin/python" -m pip install --no-deps -r "$REQ_NODEPS"
    want="$(wanted_stamp "$VENV/bin/python")"
    echo "$want" >"$STAMP"
    echo "== venv ready in $((SECONDS - t0))s"
}

ensure_venv

# Keep the suite offline and quiet: no gradio telemetry, no hub look-ups.
export GRADIO_ANALYTICS_ENABLED=False
export HF_HUB_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
export MPLBACKEND=Agg
export PYTHONDONTWRITEBYTECODE=1

"$VENV/bin/python" - <<'PY'
import sys, warnings
warnings.simplefilter("ignore")
import numpy, torch, torchvision, gradio, fastapi, pytest
from importlib.metadata import version
print("python", sys.version.split()[0], "| torch", torch.__version__,
      "| torchvision", torchvision.__version__, "| numpy", numpy.__version__,
      "| gradio", gradio.__version__, "| fastapi", fastapi.__version__,
      "| k-diffusion", version("k-diffusion"),
      "| stable-diffusion-sdkit", version("stable-diffusion-sdkit"),
      "| pytest", pytest.__version__)
PY

set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests (exit 5); treating as failure" >&2
    exit 1
fi
exit "$rc"
