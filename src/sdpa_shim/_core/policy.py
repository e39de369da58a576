"""The decision: what a flash-attention request becomes. Pure: no imports of torch or transformers.

Everything the decision depends on comes in as arguments (the request, what detection found, facts
about the model class, the settings and an SDPA probe), so it can be tested exhaustively and the
patching layer stays a thin adapter.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass

from .detect import FlashStatus
from .names import FLASH_ATTENTION_2
from .settings import Settings

#: ``Decision.chosen`` when the model keeps transformers' flash code paths, run on PyTorch kernels.
FLASH_PATH = "transformers' flash path on PyTorch kernels"
#: The name the config then reads: transformers' flash paths and every ``== "flash_attention_2"`` check.
SERVED_IMPLEMENTATION = FLASH_ATTENTION_2


class Kind(str, enum.Enum):
    """What a decision chose, as code compares it (``Decision.chosen`` is the sentence the log shows).

    A ``str`` enum: ``Kind.SDPA == "sdpa"``, so the attention entries' marks ("sdpa", "eager",
    "flash") and ``Kind`` values are interchangeable.
    """

    FLASH = "flash"  # transformers' flash path on PyTorch kernels
    SDPA = "sdpa"
    EAGER = "eager"

    def __str__(self) -> str:
        return self.value


_FLASH_REQUEST = re.compile(r"^(?P<prefix>paged\|)?(?P<impl>flash_attention_[234])$")
_HALF_DTYPES = frozenset({"float16", "bfloat16"})


@dataclass(frozen=True)
class ModelFacts:
    """What the policy needs to know about the model class being built."""

    name: str
    supports_sdpa: bool
    supports_flash: bool = True
    dtype: str | None = None  # "float32", "bfloat16", ... or None when not known yet
    registered: frozenset[str] = frozenset()  # attention names this transformers accepts
    #: transformers' flash paths of this class can run on sdpa_shim's kernels with this release (see
    #: ``_integration.flash_paths``): the registry reaches them and no flash name is imported by the model.
    flash_paths: bool = False
    #: Why SDPA support could not be read (a property that raised, ...); "" when it was read.
    facts_error: str = ""


@dataclass(frozen=True)
class Decision:
    """One downgrade: model class, what was requested, what was chosen, and why.

    ``chosen`` is what the WARNING says ("sdpa", "paged|eager", or ``FLASH_PATH``); ``kind`` is the
    same choice as a ``Kind`` for code to compare.
    """

    model: str
    requested: str
    chosen: str
    reason: str

    @property
    def kind(self) -> Kind:
        """``Kind.FLASH``, ``Kind.SDPA`` or ``Kind.EAGER`` (a ``paged|`` prefix does not change it)."""
        if self.chosen == FLASH_PATH:
            return Kind.FLASH
        return Kind(self.chosen.removeprefix("paged|"))


def flash_implementation(requested: object) -> str | None:
    """ "flash_attention_N" when ``requested`` asks for flash attention (``paged|`` allowed), else None."""
    if not isinstance(requested, str):
        return None
    match = _FLASH_REQUEST.match(requested)
    return match.group("impl") if match else None


def decide(
    requested: str,
    status: FlashStatus,
    facts: ModelFacts,
    settings: Settings,
    sdpa_probe: Callable[[], str],
) -> Decision | None:
    """Return the downgrade for a flash request that cannot be honoured, or None to leave it alone.

    ``sdpa_probe`` returns "" when SDPA runs on this torch/device/dtype, else the error; it is only
    called when SDPA is a candidate.
    """
    if flash_implementation(requested) is None:
        return None
    blocker = _flash_blocker(status, facts)
    if blocker is None:
        return None
    if settings.fallback == "auto" and facts.flash_paths and not status.usable:
        return Decision(facts.name, requested, FLASH_PATH, blocker)
    chosen, why_not_sdpa = _fallback(facts, settings, sdpa_probe)
    reason = blocker if not why_not_sdpa else f"{blocker}; {why_not_sdpa}"
    return Decision(facts.name, requested, _with_prefix(requested, chosen, facts.registered), reason)


def served_name(requested: str, registered: frozenset[str]) -> str:
    """The config value for a request kept on the flash path: flash_attention_2 (``paged|`` kept where
    this release registers it). FA3/FA4 requests land on the same path: the stand-in speaks FA2's API.
    """
    return _with_prefix(requested, SERVED_IMPLEMENTATION, registered)


def _flash_blocker(status: FlashStatus, facts: ModelFacts) -> str | None:
    """Why the request cannot run as asked, or None when it can."""
    if not status.usable:
        return status.reason
    if not facts.supports_flash:
        return f"{facts.name} does not support flash attention"
    if facts.dtype is not None and facts.dtype not in _HALF_DTYPES:
        return f"{facts.dtype} weights: flash-attn runs only float16/bfloat16"
    return None


def _fallback(facts: ModelFacts, settings: Settings, sdpa_probe: Callable[[], str]) -> tuple[str, str]:
    """The target ("sdpa" or "eager") and, when eager, why SDPA was not taken."""
    if settings.fallback == "eager":
        return "eager", "SDPA_SHIM_FALLBACK=eager"
    if facts.facts_error:
        return "eager", f"{facts.name}'s SDPA support could not be read ({facts.facts_error})"
    if not facts.supports_sdpa:
        return "eager", f"{facts.name} has no SDPA path"
    probe_error = sdpa_probe()
    if probe_error:
        return "eager", f"SDPA failed here: {probe_error}"
    return "sdpa", ""


def _with_prefix(requested: str, chosen: str, registered: frozenset[str]) -> str:
    """Keep a ``paged|`` prefix where this transformers registers the paged variant of the target."""
    if requested.startswith("paged|") and f"paged|{chosen}" in registered:
        return f"paged|{chosen}"
    return chosen
