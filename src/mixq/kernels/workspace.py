"""Per-device scratch buffers of the split-K / stream-K kernels (`triton_tc`, `cuda_gemv.gemm`):
an fp32 buffer for partial sums and int32 per-tile counters that the kernels leave at zero."""

from __future__ import annotations

import torch


class Workspace:
    """One fp32 buffer and one int32 counter buffer per device, grown on demand.

    The counters are zero between calls (the kernels reset them); with `zeroed` the fp32 buffer
    is too (a kernel that accumulates into it with atomics restores it), else its contents are
    arbitrary. A buffer that is replaced by a larger one is kept alive, since a captured CUDA
    graph may still use it; while a graph is being captured nothing is replaced, and a call
    that needs more gets fresh buffers from the graph's pool. Calls on one device share the
    buffers, so they must not run concurrently on several streams."""

    def __init__(self, zeroed: bool):
        self.zeroed = zeroed
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.retired: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _new(self, device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        fill = torch.zeros if self.zeroed else torch.empty
        return (fill(floats, dtype=torch.float32, device=device), torch.zeros(tiles, dtype=torch.int32, device=device))

    def get(self, device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        cur = self.buffers.get(key)
        if cur is not None and cur[0].numel() >= floats and cur[1].numel() >= tiles:
            return cur
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return self._new(device, floats, tiles)
        if cur is not None:
            self.retired.append(cur)
            floats, tiles = max(floats, cur[0].numel()), max(tiles, cur[1].numel())
        cur = self._new(device, floats, tiles)
        self.buffers[key] = cur
        return cur
