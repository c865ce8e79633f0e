"""Methods vLLM adds to its worker class (`--worker-extension-cls`), reached with `collective_rpc`."""

from __future__ import annotations

from apollo_train.vllm_worker import export


class TrainingWorkerExtension:
    def apollo_train_checksums(self) -> dict[str, tuple[float, float, float]]:
        """The shared weights' checksums as vLLM holds them now; a training worker that attaches after
        training changed the weights compares its views with these (the handles file's are from load)."""
        return export.checksums()
