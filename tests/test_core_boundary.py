"""The engine stays host-agnostic: only the adapters (a1111, forge, api, xyz, ui) may touch host modules."""

import ast
from pathlib import Path

CORE = ["errors", "params", "layers", "perturbations", "guidance", "patch", "rows", "fork", "maps"]
HOST_PACKAGES = ("modules", "backend", "ldm_patched", "gradio", "fastapi", "k_diffusion")


def imported_names(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_core_modules_import_no_host_code():
    root = Path(__file__).resolve().parent.parent / "lib_pag"
    for name in CORE:
        bad = [m for m in imported_names(root / f"{name}.py") if m.split(".")[0] in HOST_PACKAGES]
        assert not bad, f"lib_pag/{name}.py imports {bad}"


def test_engine_imports_without_a_webui():
    import subprocess
    import sys

    code = "import sys; import lib_pag; assert 'modules' not in sys.modules and 'gradio' not in sys.modules; print('ok')"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
