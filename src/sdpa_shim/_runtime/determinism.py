"""flash-attn's ``deterministic=True`` on torch's kernels: a backward that is bit-identical across runs.

torch's fused kernels take no ``deterministic`` argument: their backward is deterministic only while
``torch.use_deterministic_algorithms(True)`` is on, which is global state, and SDPA's fused CUDA backward
accumulates dq with atomics even then. So the forward runs with its own autograd graph (SDPA's math kernel
on CUDA), and the backward replays that graph with the switch flipped for the call only. The graph lives
in saved tensors, so a second backward through it (``retain_graph=True``) works and agrees bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _deterministic_algorithms(warn_only: bool) -> Iterator[None]:
    """torch's global determinism switch, on for the block and restored after (not thread-safe)."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn)


@contextlib.contextmanager
def _math_sdpa_on_cuda(inputs: Sequence[Tensor]) -> Iterator[None]:
    """SDPA's math kernel for the forward whose graph the deterministic backward replays: the fused
    CUDA kernels' backward accumulates dq with atomics (flash-attn's own tests saw different gradients
    from one backward to the next on an H100), the math kernel's matmuls do not."""
    if not any(x.is_cuda for x in inputs):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


class _DeterministicBackward(torch.autograd.Function):
    """Runs ``fn`` with its own autograd graph; the backward replays that graph deterministically.

    torch's fused kernels take no ``deterministic`` argument: their backward is deterministic only
    while ``torch.use_deterministic_algorithms(True)`` is on (flash's split dq accumulators, index_add
    without atomics), which is global state. So the switch is flipped for this backward only.
    """

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Sequence[Tensor]], *inputs: Tensor) -> tuple[Tensor, ...]:
        with torch.enable_grad(), _math_sdpa_on_cuda(inputs):
            leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
            outs = tuple(fn(*leaves))
        # Saved tensors, not attributes: the inner graph then lives exactly as long as the outer one
        # (kept by ``retain_graph=True``, freed with it otherwise), so backward can run again.
        ctx.save_for_backward(*leaves, outs[0])
        if len(outs) > 1:
            ctx.mark_non_differentiable(*(o for o in outs[1:]))
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        *leaves, out = ctx.saved_tensors
        wanted = [x for x in leaves if x.requires_grad]
        # retain_graph: the inner graph must survive for a second backward through the outer one
        # (flash-attn's determinism tests, gradient penalties); it is freed with the outer graph.
        try:
            with _deterministic_algorithms(warn_only=False):
                got = torch.autograd.grad(out, wanted, grads[0], retain_graph=True, allow_unused=True)
        except RuntimeError as exc:  # an op with no deterministic kernel (e.g. cuBLAS without its env var)
            log.warning("deterministic backward not available here (%s); using the default kernels", exc)
            with _deterministic_algorithms(warn_only=True):
                got = torch.autograd.grad(out, wanted, grads[0], retain_graph=True, allow_unused=True)
        it = iter(got)
        return (None, *(next(it) if x.requires_grad else None for x in leaves))


def deterministic_backward(fn: Callable[..., Sequence[Tensor]], *inputs: Tensor) -> tuple[Tensor, ...]:
    """``fn(*inputs)`` whose backward is bit-identical across runs (flash-attn's ``deterministic``)."""
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)):
        return tuple(fn(*inputs))
    return _DeterministicBackward.apply(fn, *inputs)
