"""Activation offload: the input of each checkpointed decoder layer lives in host memory.

Under gradient checkpointing the one tensor a decoder layer keeps for backward is its input;
with it, a long row's activations still grow with the layer count. Here that input is copied to
pinned host memory on a side CUDA stream while the forward goes on (its GPU memory is reused once
the copy is done), and brought back on the same stream during backward — the layer before it is
prefetched while this one is recomputed, so the copy overlaps compute. The references are
Unsloth's offloaded gradient checkpointing and torchtune's ``OffloadActivations``; ours hooks
only the checkpointed layers' saved inputs, so nothing else of the graph moves.

A non-CUDA tensor is copied within host memory: nothing is saved, but the same hooks run (the
CPU tests compare gradients through them).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from xtuner_lite.errors import XtunerError


@dataclass(eq=False)  # hashable by identity: weak references point at entries
class _Offloaded:
    """One saved layer input: its host copy, and the GPU copy while it comes back."""

    host: torch.Tensor
    device: torch.device
    copied: Any = None  # CUDA event: the host copy is complete
    previous: Callable[[], _Offloaded | None] = lambda: None  # the input saved before it
    back: torch.Tensor | None = None  # prefetched GPU copy
    ready: Any = None  # CUDA event: ``back`` is complete


@dataclass
class ActivationOffload:
    """Saved-tensor hooks that move what is saved to host memory and bring it back."""

    offloaded_bytes: int = 0  # bytes moved since the last reset (tests, logs)
    _stream: Any = None
    _last: Callable[[], _Offloaded | None] = field(default=lambda: None)

    def pack(self, tensor: torch.Tensor) -> _Offloaded:
        tensor = tensor.detach()
        entry = _Offloaded(torch.empty(0), tensor.device, previous=self._last)
        if tensor.device.type == "cuda":
            entry.host, entry.copied = self._to_host(tensor)
        else:
            entry.host = tensor.clone()
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        self._last = weakref.ref(entry)
        return entry

    def unpack(self, entry: _Offloaded) -> torch.Tensor:
        if entry.device.type != "cuda":
            return entry.host
        if entry.back is None:
            self._prefetch(entry)
        current = torch.cuda.current_stream(entry.device)
        current.wait_event(entry.ready)
        back, entry.back, entry.host = entry.back, None, torch.empty(0)
        back.record_stream(current)  # made on the side stream, used and freed on this one
        previous = entry.previous()
        if previous is not None and previous.back is None and previous.host.numel():
            self._prefetch(previous)  # backward needs it next: copy it while this layer runs
        return back

    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        stream = self._side_stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is written
        host = torch.empty_like(tensor, device="cpu", pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        tensor.record_stream(stream)  # its memory is not reused before the copy is done
        return host, copied

    def _prefetch(self, entry: _Offloaded) -> None:
        stream = self._side_stream(entry.device)
        with torch.cuda.stream(stream):
            stream.wait_event(entry.copied)
            entry.back = entry.host.to(entry.device, non_blocking=True)
            entry.ready = torch.cuda.Event()
            entry.ready.record(stream)

    def around(self, checkpoint: Callable[..., Any]) -> Callable[..., Any]:
        """``checkpoint`` (a layer's checkpointing function) with what it saves offloaded."""

        def offloaded(*args: Any, **kwargs: Any) -> Any:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                return checkpoint(*args, **kwargs)

        return offloaded


def offload_activations(model: torch.nn.Module) -> ActivationOffload:
    """Offload the saved input of every checkpointed decoder layer of ``model``.

    transformers gives each module it checkpoints through (a decoder layer; the decoder itself
    in remote-code models such as InternLM2's) a ``_gradient_checkpointing_func``: wrapping it
    is the one place every checkpointed call passes."""
    layers = [
        module
        for module in model.modules()
        if getattr(module, "gradient_checkpointing", False) is True
        and callable(getattr(module, "_gradient_checkpointing_func", None))
    ]
    if not layers:
        raise XtunerError(
            "train.offload_activations moves the inputs of checkpointed layers to host memory, "
            "but no layer is checkpointed: set model.gradient_checkpointing"
        )
    offload = ActivationOffload()
    for layer in layers:
        layer._gradient_checkpointing_func = offload.around(layer._gradient_checkpointing_func)
    return offload


__all__ = ["ActivationOffload", "offload_activations"]
