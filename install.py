"""Run by the WebUI at start-up. PAG needs nothing beyond what the WebUI ships: no network, no torch.

It only says, in one line, when the host is too old or not one PAG supports, instead of failing later.
"""

import os
import re
import subprocess

MIN_A1111 = (1, 7, 0)


def _host_version() -> str | None:
    """The WebUI's version tag as A1111 reads it (``git describe --tags`` in the WebUI folder, e.g. ``v1.10.1``)."""
    try:
        return subprocess.check_output(["git", "describe", "--tags"], cwd=os.getcwd(), text=True,
                                       stderr=subprocess.DEVNULL, timeout=5).strip()
    except Exception:
        return None


def _forge_family(root: str) -> bool:
    return any(os.path.isdir(os.path.join(root, d)) for d in ("modules_forge", "backend", "ldm_patched"))


def check(tag: str | None, forge_family: bool = False) -> str | None:
    """A one-line warning for an unsupported host, or None."""
    if not tag or forge_family:
        return None  # Forge / reForge tag their releases in their own scheme; all of them are supported
    match = re.search(r"v?(\d+)\.(\d+)(?:\.(\d+))?", tag)
    if not match:
        return None
    version = tuple(int(g or 0) for g in match.groups())
    if version < MIN_A1111:
        return (f"[sd-webui-pag] WebUI {tag} is older than 1.7.0, which PAG does not support: "
                "update to A1111 1.7–1.10, or use Forge or reForge.")
    return None


if __name__ == "__main__":
    message = check(_host_version(), _forge_family(os.getcwd()))
    if message:
        print(message)
