"""The README's step window as an oracle for the window tests of every host."""

import math

SCALE = 3.0


def window(n: int, *, start=0.0, end=1.0, schedule="linear") -> list[float]:
    """README: call k of n is in the window when start ≤ k/n < end; the shape decays from ``SCALE`` there."""
    out = []
    for k in range(n):
        t = k / n
        if not start <= t < end:
            out.append(0.0)
            continue
        u = (t - start) / (end - start)
        out.append(SCALE * {"constant": 1.0, "linear": 1.0 - u, "cosine": 0.5 * (1 + math.cos(math.pi * u))}[schedule])
    return out
