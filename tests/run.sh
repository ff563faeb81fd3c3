#!/usr/bin/env bash
# Run the test suite: `bash tests/run.sh [pytest args...]` from anywhere.
#
# Creates ./.venv (Python 3.11) on first use and installs requirements-test.txt
# plus requirements-test-nodeps.txt (--no-deps). It also creates ./.venv-gradio4
# from tests/gradio4/requirements.txt (gradio 4.40.0, Forge's pin), in which
# tests/test_gradio4_ui.py runs tests/gradio4/build_accordion.py. Each venv is
# reused while its own stamp file (sha256 of its requirement files and the
# interpreter) matches; otherwise it is rebuilt from scratch. Force a rebuild
# with `rm -rf .venv` (or .venv-gradio4).
# Override the interpreter with PYTHON=/path/to/python3.11.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
REQ="requirements-test.txt"
REQ_NODEPS="requirements-test-nodeps.txt"
VENV_G4="$ROOT/.venv-gradio4"
REQ_G4="tests/gradio4/requirements.txt"

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
    # wanted_stamp PYTHON REQFILE...: interpreter version + the requirement files; any change rebuilds.
    local py="$1"
    shift
    {
        "$py" -c 'import sys; print(sys.version)'
        sha256sum "$@"
    } | sha256sum | cut -d' ' -f1
}

ensure_venv() {
    # ensure_venv VENV REQFILE [NODEPS_REQFILE]: (re)create VENV unless VENV/.requirements.sha256 matches.
    local venv="$1" req="$2" nodeps="${3:-}" py want
    local stamp="$venv/.requirements.sha256"
    local reqs=("$req")
    [ -z "$nodeps" ] || reqs+=("$nodeps")
    if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] &&
        [ "$(cat "$stamp")" = "$(wanted_stamp "$venv/bin/python" "${reqs[@]}")" ]; then
        return 0
    fi
    py="$(find_python)"
    echo "== creating $venv with $py ($("$py" --version 2>&1))"
    local t0=$SECONDS
    rm -rf "$venv"
    "$py" -m venv "$venv"
    export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
    "$venv/bin/python" -m pip install -r "$req"
    [ -z "$nodeps" ] || "$venv/bin/python" -m pip install --no-deps -r "$nodeps"
    want="$(wanted_stamp "$venv/bin/python" "${reqs[@]}")"
    echo "$want" >"$stamp"
    echo "== venv ready in $((SECONDS - t0))s"
}

ensure_venv "$VENV" "$REQ" "$REQ_NODEPS"
ensure_venv "$VENV_G4" "$REQ_G4"

# Keep the suite offline and quiet: no gradio telemetry, no hub look-ups.
export GRADIO_ANALYTICS_ENABLED=False
export HF_HUB_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
export MPLBACKEND=Agg
export PYTHONDONTWRITEBYTECODE=1

"$VENV/bin/python" - <<'PY'
import os, sys, warnings
warnings.simplefilter("ignore")
import numpy, torch, torchvision, gradio, fastapi, pytest
from importlib.metadata import version
print("python", sys.version.split()[0], "| torch", torch.__version__,
      "| torchvision", torchvision.__version__, "| numpy", numpy.__version__,
      "| gradio", gradio.__version__, "| fastapi", fastapi.__version__,
      "| k-diffusion", version("k-diffusion"),
      "| stable-diffusion-sdkit", version("stable-diffusion-sdkit"),
      "| pytest", pytest.__version__,
      # the vector kernels that ran (ATEN_CPU_CAPABILITY=avx2 or =default emulates other CPUs)
      "| cpu capability", torch.backends.cpu.get_cpu_capability()
      + (f" (ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']})" if os.environ.get("ATEN_CPU_CAPABILITY") else ""))
PY

set +e
# no path given: pytest.ini's testpaths (tests/); `bash tests/run.sh tests/test_layers.py -k u9` runs just that
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests (exit 5); treating as failure" >&2
    exit 1
fi
exit "$rc"
