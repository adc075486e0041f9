"""Scale-out through torch_xla SPMD (GSPMD): a named device mesh and sharding annotations.

``--mesh data=2,fsdp=2,expert=2`` builds a mesh over all devices. The batch is split over every
axis; weights are sharded FSDP-style along ``fsdp`` (first dimension), and the stacked expert
weights [E, out, in] along ``expert`` as well. XLA's partitioner inserts the collectives; on a
multi-host pod the same annotations span every host.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..model.moe import MLPExperts
from .backend import default_pjrt_device

AXES = ("data", "fsdp", "expert")


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,fsdp=2"`` → {"data": 2, "fsdp": 2}, validated."""
    axes: dict[str, int] = {}
    for part in spec.split(","):
        name, _, size = part.strip().partition("=")
        if name not in AXES or not size.isdigit() or int(size) < 1 or name in axes:
            raise ValueError(f"bad mesh spec {spec!r}: expected comma-separated AXIS=SIZE with "
                             f"AXIS in {', '.join(AXES)}, each once, e.g. 'data=2,fsdp=2'")
        axes[name] = int(size)
    return axes


@dataclass
class Parallelism:
    mesh: Any = None  # torch_xla.distributed.spmd.Mesh, or None for a single device
    axes: dict[str, int] | None = None

    @classmethod
    def from_spec(cls, spec: str | None, device: str) -> Parallelism:
        """Parse ``--mesh`` and switch torch_xla to SPMD; must run before any XLA device is used
        (torch_xla replicates already-initialised tensors, and that path crashed on 2.9)."""
        if not spec:
            return cls()
        axes = parse_mesh(spec)
        if device not in ("auto", "xla") or importlib.util.find_spec("torch_xla") is None:
            raise ValueError("--mesh needs torch_xla SPMD: use --device auto or xla in .venv-xla")
        os.environ.setdefault("PJRT_DEVICE", default_pjrt_device())
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        xr.use_spmd()
        devices = xr.global_runtime_device_count()
        if int(np.prod(list(axes.values()))) != devices:
            raise ValueError(f"mesh {spec!r} covers {int(np.prod(list(axes.values())))} devices "
                             f"but {devices} are present")
        mesh = xs.Mesh(np.arange(devices), tuple(axes.values()), tuple(axes))
        xs.set_global_mesh(mesh)
        return cls(mesh, axes)

    def describe(self) -> str:
        if self.mesh is None:
            return ""
        spec = ",".join(f"{k}={v}" for k, v in self.axes.items())
        return f" with SPMD mesh {spec}"

    def _axis(self, name: str) -> str | None:
        return name if name in self.axes else None

    def shard_model(self, model: nn.Module) -> None:
        """Shard the model's matrices over the mesh; its buffers (the routers' bias and load
        counts) are replicated. Marked so from the start: the first step's outputs are
        replicated, and an input that the first step took unmarked makes the second step
        compile again."""
        if self.mesh is None:
            return
        import torch_xla.distributed.spmd as xs

        for buffer in model.buffers():
            xs.mark_sharding(buffer, self.mesh, (None,) * buffer.dim())

        expert_params = {id(p) for m in model.modules() if isinstance(m, MLPExperts)
                         for p in m.parameters()}
        for param in model.parameters():
            if param.dim() < 2:
                continue  # norms and scales: small, replicated
            if id(param) in expert_params:
                spec = (self._axis("expert"), self._axis("fsdp"), None)
            else:
                spec = (self._axis("fsdp"),) + (None,) * (param.dim() - 1)
            xs.mark_sharding(param, self.mesh, spec)

    def shard_batch(self, batch: Tensor) -> Tensor:
        """[accum, B, T] batches: B is split over every mesh axis."""
        if self.mesh is not None:
            import torch_xla.distributed.spmd as xs
            xs.mark_sharding(batch, self.mesh, (None, tuple(self.axes), None))
        return batch
