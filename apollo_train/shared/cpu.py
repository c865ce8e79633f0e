"""CPU set-up every process of ours needs before it computes.

Linux hands out the AMX tile registers only to processes that ask for them. Without asking,
oneDNN's bf16 kernels fall back to a path ~50x slower here (a tiny model's training step took
0.9 s instead of 0.02 s), and vLLM's CPU attention, which assumes AMX, dies with "Illegal
instruction". Asking is harmless where AMX is absent.
"""

from __future__ import annotations

import torch


def enable_amx() -> None:
    init = getattr(torch._C._cpu, "_init_amx", None)
    if init is not None:
        init()
