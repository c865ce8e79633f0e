"""The optimizer's Triton kernels on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter has to be switched on before the kernels are defined, so the check runs in a child
process. It covers the pointer tables: several matrices per launch, several memory layouts per bucket
(a transposed matrix, strided views of one fused tensor, an offset that is not a multiple of 16),
bucket slots that differ from launch order, and the update kernel's flag (a skipped update writes
nothing). The interpreter's bf16 matmul is wrong, so it checks fp16; the CUDA tests in test_optim.py
cover bf16 on a GPU.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")


def check_kernels():
    from worker.optim import kernels
    from worker.optim.apollo import _oriented

    torch.manual_seed(0)
    fused = torch.randn(400, 70, dtype=torch.float16)
    # oriented (96, 64) each: two row views of a fused tensor (one at an unaligned offset), a transposed
    # standalone matrix, and a row view in between them
    params = [fused.narrow(0, 0, 96).narrow(1, 0, 64), torch.randn(64, 96, dtype=torch.float16),
              fused.narrow(0, 101, 96).narrow(1, 3, 64), fused.narrow(0, 200, 96).narrow(1, 0, 64)]
    grads = [torch.randn(p.shape, dtype=p.dtype) for p in params]
    grads[1] = torch.randn(96, 64, dtype=torch.float16).T  # a transposed gradient: another layout
    oriented = [_oriented(g) for g in grads]
    k = len(params)
    for rank in (1, 8):
        proj = torch.randn(k, 64, rank, dtype=torch.float16)
        for moments in (None, (torch.randn(k, 96, rank), torch.rand(k, 96, rank))):
            m, v, norms = kernels.project(oriented, proj, moments, 0.9, 0.999, 1e-6)
            for i, g in enumerate(oriented):
                r = g.float() @ proj[i].float()
                m0, v0 = (moments[0][i], moments[1][i]) if moments else (0.0, 0.0)
                em, ev = 0.9 * m0 + 0.1 * r, 0.999 * v0 + 0.001 * r * r
                u = em / (ev.sqrt() + 1e-6)
                close = {"rtol": 1e-4, "atol": 1e-4}
                torch.testing.assert_close(m[i], em, **close)
                torch.testing.assert_close(v[i], ev, **close)
                torch.testing.assert_close(norms[:, i], torch.stack([u.square().sum(1), r.square().sum(1),
                                                                     g.float().square().sum(1)]), **close)
    outside = fused.clone()
    for channels in (96, 1):
        coef = torch.randn(k, channels)
        before = [p.clone() for p in params]
        kernels.update(params, grads, coef, -0.01)
        for i in range(k):
            expected = (_oriented(before[i]).float() * 0.99
                        + coef[i][:, None] * _oriented(grads[i]).float())
            torch.testing.assert_close(_oriented(params[i]).float(), expected.half().float(),
                                       rtol=1e-3, atol=1e-3)
    before = [p.clone() for p in params]
    kernels.update(params, grads, coef, -0.01, ok=torch.tensor(False))  # a skipped update writes nothing
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    kernels.update(params, grads, coef, -0.01, ok=torch.tensor(True))
    assert not any(torch.equal(p, b) for p, b in zip(params, before))
    touched = torch.zeros(fused.shape, dtype=torch.bool)
    touched[0:96, 0:64] = touched[101:197, 3:67] = touched[200:296, 0:64] = True
    assert torch.equal(fused[~touched], outside[~touched])


def test_kernels_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "import test_optim_kernels as t; t.check_kernels(); print('kernels ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "kernels ok" in out.stdout, out.stdout + out.stderr
