"""A vLLM worker extension for visibility_bench.py: vLLM's own way to take new weights from a trainer.

Start the server with `VLLM_SERVER_DEV_MODE=1` and
`--worker-extension-cls benchmarks.vllm_weight_update.WeightUpdateExtension` (it derives from
apollo-train's own extension, so training stays available); then
`POST /collective_rpc {"method": "bench_load_weights", "args": [payload]}` makes every vLLM worker
rebuild the trainer's tensors from their CUDA IPC handles and copy them in with the model's own
`load_weights`, which is what vLLM's IPC weight-transfer engine (`/update_weights`) does for an
unquantized model. On CPU the trainer's tensors come through a file in /dev/shm instead.
Benchmark use only: dev mode opens unauthenticated admin routes.
"""

from __future__ import annotations

import base64
import pickle
import time

from apollo_train.vllm_worker.extension import TrainingWorkerExtension


def encode(tensors: dict) -> str:
    """The payload for bench_load_weights: IPC handles of CUDA tensors (kept alive by the caller),
    or the tensors saved to a /dev/shm file on CPU."""
    import torch

    first = next(iter(tensors.values()))
    if first.is_cuda:
        from torch.multiprocessing.reductions import reduce_tensor

        info = {"kind": "cuda_ipc", "tensors": [(n, reduce_tensor(t)[1]) for n, t in tensors.items()]}
    else:
        import os
        import tempfile

        fd, path = tempfile.mkstemp(prefix="apollo-train-bench-", suffix=".pt", dir="/dev/shm")
        os.close(fd)
        torch.save(tensors, path)
        info = {"kind": "file", "path": path}
    return base64.b64encode(pickle.dumps(info)).decode()


class WeightUpdateExtension(TrainingWorkerExtension):
    def bench_load_weights(self, payload: str) -> dict:
        import torch

        t0 = time.perf_counter()
        info = pickle.loads(base64.b64decode(payload))
        if info["kind"] == "cuda_ipc":
            from torch.multiprocessing.reductions import rebuild_cuda_tensor

            weights = [(name, rebuild_cuda_tensor(*args)) for name, args in info["tensors"]]
        else:
            import os

            weights = list(torch.load(info["path"], mmap=True, weights_only=True).items())
            os.unlink(info["path"])
        t1 = time.perf_counter()
        self.model_runner.model.load_weights(weights)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        return {"open_s": t1 - t0, "load_weights_s": t2 - t1, "tensors": len(weights)}
