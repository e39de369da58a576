"""sdpa_shim: load and run models that ask for FlashAttention when flash-attn cannot run here.

``import sdpa_shim`` activates the shim (unless ``SDPA_SHIM=0``): from then on a flash-attention
request that cannot be honoured is served on PyTorch's kernels, with one WARNING saying what was
asked, what runs instead and why. On transformers 4.56+ the model keeps transformers' flash path (its
config still reads "flash_attention_2") and each attention call runs on PyTorch kernels; before 4.56,
or with ``SDPA_SHIM_FALLBACK=sdpa``, the request is downgraded to "sdpa" (or "eager" where the model or
SDPA cannot serve). Requests that would work are never touched. Importing this module imports neither
torch nor transformers, nor (until transformers is imported) wrapt.
"""

from __future__ import annotations

from ._core.settings import install_name_once_if_logging_loaded
from ._integration.patch import activate, deactivate, is_active
from ._version import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: this import runs at every start
if TYPE_CHECKING:
    from ._core.policy import Decision

__all__ = ["Decision", "__version__", "activate", "deactivate", "decisions", "is_active"]


def decisions() -> list[Decision]:
    """Every distinct decision made so far in this process (flash path or downgrade), in the order first
    made (see ``Decision``).

    Deduplicated like the WARNING: a decision made again (same model class, requested, chosen and
    reason: a second load of the same model, the sub-models of every load) is listed once, so the
    list stays bounded however many models the process builds.
    """
    from ._core.decisions import decisions as recorded

    return recorded()


def __getattr__(name: str) -> object:
    if name == "Decision":  # imported on first use: keeps ``import sdpa_shim`` in the milliseconds
        from ._core.policy import Decision

        return Decision
    raise AttributeError(f"module 'sdpa_shim' has no attribute {name!r}")


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext sdpa_shim``: activate for this kernel."""
    activate()


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext sdpa_shim``: put transformers back as it was (``deactivate``)."""
    deactivate()


activate()
install_name_once_if_logging_loaded()  # "sdpa_shim" once per log line, also for records of older call sites
