"""Which vLLM releases apollo-train runs on: tested ones pass, older ones are refused, newer ones warn.

We depend on a handful of vLLM surfaces (docs/design.md lists them): a version we have not run may
have moved one, so it is named in a warning; versions before the first we support lack some of them.
"""

from __future__ import annotations

import re

TESTED = ("0.26.0", "0.32.0")  # vLLM for CUDA on an H200, and the CPU build
OLDEST = (0, 26)  # endpoint plugins and the loader/worker-extension interfaces we use


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def check(version: str) -> tuple[str | None, str | None]:
    """(refusal, warning) for a vLLM version string; at most one of them is set."""
    if _release(version)[:2] < OLDEST:
        return (f"vLLM {version} is older than {OLDEST[0]}.{OLDEST[1]}, the first release whose plugin and "
                f"model-loader interfaces apollo-train uses; upgrade vLLM"), None
    if version.split("+")[0] not in TESTED:
        return None, (f"vLLM {version} has not been tested with apollo-train (tested: {', '.join(TESTED)}); "
                      f"a start-up check proves that writes reach vLLM's compute, but report problems")
    return None, None


def installed() -> str:
    try:
        import vllm

        return vllm.__version__
    except Exception:
        return "unknown"
