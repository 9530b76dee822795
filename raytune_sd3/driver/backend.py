"""Ray Train's torch process group, with its collective library chosen by what the workers' torch can use.

Ray picks NCCL whenever workers reserve GPUs; on a node whose torch has no CUDA (a CPU build of torch, or a Ray
that advertises GPUs for scheduling tests) NCCL's setup fails inside Ray, which retries it without end. Asking the
workers first, the process group comes up (gloo) and the loop stops with an error that says what to fix.
"""

from __future__ import annotations

import dataclasses

from ray.train.torch import TorchConfig

# private, and no public one does this: Ray Train's only hook into its process-group setup is TorchConfig.backend_cls
from ray.train.torch.config import _TorchBackend


def _nccl_usable() -> bool:
    import torch
    import torch.distributed as dist

    return torch.cuda.is_available() and dist.is_nccl_available()


class _WorkerChosenBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        if backend_config.backend == "auto":
            nccl = all(worker_group.execute(_nccl_usable))
            backend_config = dataclasses.replace(backend_config, backend="nccl" if nccl else "gloo")
        super().on_start(worker_group, backend_config)


@dataclasses.dataclass
class WorkerTorchConfig(TorchConfig):
    """TorchConfig whose backend "auto" is NCCL where every worker's torch can use it, else gloo. (Not None: Ray
    Train's TorchTrainer turns None into NCCL whenever the workers reserve GPUs.)"""

    backend: str | None = "auto"

    @property
    def backend_cls(self):
        return _WorkerChosenBackend
