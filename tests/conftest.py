import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests" / "webui"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402

torch.set_num_threads(1)  # the suite runs on 2 shared cores; more threads only contend


import pytest  # noqa: E402


@pytest.fixture
def float64():
    """The test runs in float64 (``tests/exactness.py``: the default dtype, ldm's fp32-only spots)."""
    from tests.exactness import float64_mode

    with float64_mode():
        yield
