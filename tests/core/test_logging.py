"""What the shim prints: each message once per process, in the same words wherever it is noticed, and
the ``sdpa_shim`` name exactly once per line, with Python's last-resort handler (nothing configured) and
with ``logging.basicConfig``; warnings of hooked transformers methods point at the caller, not the shim."""

from __future__ import annotations

import logging
import sys
import textwrap
import warnings

import pytest

import sdpa_shim
from helpers import SRC
from helpers.expect import EXPECTED_CHOSEN
from helpers.fresh import run_python
from helpers.installs import PTH_LINE
from helpers.loading import without_shim
from sdpa_shim._core import decisions as _decisions
from sdpa_shim._core import settings as _settings
from sdpa_shim._core.policy import Decision

BAD_SDPA_SHIM = (
    "sdpa_shim: SDPA_SHIM='maybe' is not valid; accepted values: 1/true/on/yes or 0/false/off/no (any case); "
    "using the default (as if unset)"
)
BAD_FALLBACK = "SDPA_SHIM_FALLBACK='fast' is not valid; accepted values: auto/sdpa/eager; using auto"
DECISION = f"LlamaForCausalLM requested flash_attention_2; using {EXPECTED_CHOSEN} instead: flash-attn is not installed"
NAMED = 'logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")'
UNNAMED = 'logging.basicConfig(format="%(levelname)s: %(message)s")'
LOAD = """
    from helpers.models import tiny_llama_config
    from transformers import LlamaForCausalLM
    for _ in range(2):
        config = tiny_llama_config()
        config._attn_implementation = "flash_attention_2"
        LlamaForCausalLM(config)
"""


def transformers_hooked() -> bool:
    import transformers.modeling_utils  # noqa: F401

    from sdpa_shim._integration.patch import patched_methods

    return bool(patched_methods())


def flash_attn_unusable() -> bool:
    from sdpa_shim._core.detect import flash_status

    return not flash_status("flash_attention_2").usable


needs_downgrade = pytest.mark.skipif(
    "not flash_attn_unusable() or not transformers_hooked()", reason="needs a downgrade to happen here"
)


# --------------------------------------------------------------------------- one message, same words


def test_startup_file_and_settings_say_the_same_words():
    import _sdpa_shim_startup as startup

    assert startup.bad_value_line("maybe") == BAD_SDPA_SHIM + "\n"
    assert startup._BOOL_ACCEPTED == _settings.BOOL_ACCEPTED
    assert startup._ENABLED_DEFAULT_TEXT == _settings.ENABLED_DEFAULT_TEXT
    assert set(startup._TRUE_VALUES) == _settings.TRUE_VALUES
    assert set(startup._FALSE_VALUES) == _settings.FALSE_VALUES


def test_bad_sdpa_shim_is_reported_once_though_the_pth_runs_twice_and_the_package_is_imported():
    """Python 3.11 runs a venv's .pth twice (lib and lib64); ``import sdpa_shim`` notices it again."""
    code = f"""
        exec({PTH_LINE!r})
        exec({PTH_LINE!r})
        import sdpa_shim
        from sdpa_shim._core.settings import read_settings
        read_settings()
        print(sdpa_shim.is_active())
    """
    result = run_python(code, SDPA_SHIM="maybe")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"]  # as if unset: the import activates
    assert result.stderr == BAD_SDPA_SHIM + "\n"


def test_bad_sdpa_shim_without_a_startup_file_is_reported_once_by_the_import():
    result = run_python(
        "import sdpa_shim, sdpa_shim._core.settings as s; s.read_settings()", SDPA_SHIM="maybe"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == BAD_SDPA_SHIM + "\n"


@pytest.mark.parametrize(
    ("configure", "expected"),
    [
        ("", f"sdpa_shim: {BAD_FALLBACK}"),
        (NAMED, f"WARNING sdpa_shim: {BAD_FALLBACK}"),
        (UNNAMED, f"WARNING: sdpa_shim: {BAD_FALLBACK}"),
    ],
    ids=["last-resort", "basicConfig-with-name", "basicConfig-without-name"],
)
def test_bad_value_once_with_the_name_once(configure, expected):
    code = f"""
        import logging
        {configure}
        import sdpa_shim
        from sdpa_shim._core.settings import read_settings
        for _ in range(3):
            read_settings()
    """
    result = run_python(code, SDPA_SHIM_FALLBACK="fast")
    assert result.returncode == 0, result.stderr
    assert result.stderr == expected + "\n"


@needs_downgrade
@pytest.mark.parametrize(
    ("configure", "expected"),
    [
        ("", f"sdpa_shim: {DECISION}"),
        (NAMED, f"WARNING sdpa_shim: {DECISION}"),
        (UNNAMED, f"WARNING: sdpa_shim: {DECISION}"),
    ],
    ids=["last-resort", "basicConfig-with-name", "basicConfig-without-name"],
)
def test_decision_once_with_the_name_once(configure, expected):
    code = f"import logging\n{configure}\nimport sdpa_shim\n{textwrap.dedent(LOAD)}print(len(sdpa_shim.decisions()))\n"
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "sdpa_shim" in line]
    assert lines == [expected], result.stderr
    assert result.stdout.split() == ["1"]  # two models built: one decision in the record


@pytest.mark.parametrize(
    ("configure", "expected"),
    [
        ("", "sdpa_shim: internal error in somewhere (RuntimeError: boom); it carried on"),
        (NAMED, "ERROR sdpa_shim: internal error in somewhere (RuntimeError: boom); it carried on"),
    ],
    ids=["last-resort", "basicConfig-with-name"],
)
def test_messages_of_older_call_sites_keep_the_name_once(configure, expected):
    """A record whose text still starts with ``sdpa_shim: `` (faults, the stand-in's announcer)."""
    code = f"""
        import logging
        {configure}
        import sdpa_shim
        from sdpa_shim._core import faults
        faults.report("somewhere", RuntimeError("boom"), "it carried on")
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == expected


def test_a_handler_showing_the_name_gets_no_prefix(caplog):
    """pytest's own handlers print ``%(name)s``: the message itself carries no prefix."""
    caplog.set_level(logging.WARNING, logger="sdpa_shim")
    _settings.parse_choice("SDPA_SHIM_FALLBACK", "fast", _settings.FALLBACK_VALUES, "auto")
    [record] = [r for r in caplog.records if r.name == "sdpa_shim"]
    assert record.getMessage() == BAD_FALLBACK


# --------------------------------------------------------------------------- composite models, the record


class _Composite:
    """Stands for a composite model's ``__init__``: its sub-models are decided while it is on the stack."""

    def __init__(self, sub_choice: str, sub_reason: str) -> None:
        _decisions.record(Decision("_Composite", "flash_attention_2", "sdpa", "flash-attn is not installed"))
        _decisions.record(Decision("TextModel", "flash_attention_2", "sdpa", "flash-attn is not installed"))
        _decisions.record(Decision("VisionModel", "flash_attention_2", sub_choice, sub_reason))


def test_composite_load_is_one_warning_unless_a_sub_model_chooses_otherwise(shim_records):
    _Composite("sdpa", "flash-attn is not installed")
    assert [r.getMessage() for r in shim_records()] == [
        "_Composite requested flash_attention_2; using sdpa instead: flash-attn is not installed"
    ]
    debug = [r.getMessage() for r in shim_records(logging.DEBUG) if r.levelno == logging.DEBUG]
    assert (
        "TextModel (in _Composite) requested flash_attention_2; using sdpa instead: flash-attn is not installed"
        in debug
    )
    _decisions.clear()
    _Composite("eager", "flash-attn is not installed; VisionModel has no SDPA path")
    warned = [r.getMessage() for r in shim_records() if r.getMessage().startswith("VisionModel")]
    assert warned == [
        "VisionModel (in _Composite) requested flash_attention_2; using eager instead: "
        "flash-attn is not installed; VisionModel has no SDPA path"
    ]
    assert [d.model for d in sdpa_shim.decisions()] == ["_Composite", "TextModel", "VisionModel"]


def test_the_record_is_deduplicated_like_the_warning(shim_records):
    decision = Decision("M", "flash_attention_2", "sdpa", "flash-attn is not installed")
    for _ in range(1000):
        _decisions.record(decision)
    _decisions.record(Decision("M", "flash_attention_2", "sdpa", "no CUDA device"))
    assert sdpa_shim.decisions() == [decision, Decision("M", "flash_attention_2", "sdpa", "no CUDA device")]
    assert len(shim_records()) == 2


@needs_downgrade
def test_llava_load_is_one_warning_naming_the_top_level_class(tmp_path, shim_records):
    from transformers import LlavaForConditionalGeneration

    from helpers.models import save_tiny_llava

    directory = save_tiny_llava(tmp_path / "llava")
    for _ in range(2):
        LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="flash_attention_2")
    [warning] = shim_records()
    assert warning.getMessage().startswith("LlavaForConditionalGeneration requested flash_attention_2; ")
    decided = [d.model for d in sdpa_shim.decisions()]  # 4.56+: LlamaModel too, decided on its own class
    assert decided[0] == "LlavaForConditionalGeneration" and len(decided) == len(set(decided))


# --------------------------------------------------------------------------- warnings of hooked methods


def _hooked(function):
    """``function`` wrapped the way the shim wraps transformers' methods."""
    from sdpa_shim._integration.guard import guarded
    from sdpa_shim._integration.ledger import make_wrapper

    return make_wrapper(function, guarded(lambda instance, args, kwargs: None, function.__name__))


def _warns(stacklevel: int) -> None:
    warnings.warn("from a hooked method", FutureWarning, stacklevel=stacklevel)


def _calls_hooked(hooked) -> int:
    hooked(3)  # stacklevel=3 names this line
    return sys._getframe().f_lineno - 1


def test_a_hooked_method_warning_points_at_its_caller():
    hooked = _hooked(_warns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hooked(2)
        line = sys._getframe().f_lineno - 1
        outer = _calls_hooked(hooked)
    assert [(w.filename, w.lineno, w.category) for w in caught] == [
        (__file__, line, FutureWarning),
        (__file__, outer, FutureWarning),
    ]


def test_a_hooked_method_warning_follows_the_users_filters():
    hooked = _hooked(_warns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # once per location, as Python shows FutureWarning by default
        sys.modules[__name__].__dict__.pop("__warningregistry__", None)
        for _ in range(3):
            hooked(2)
        assert len(caught) == 1
        warnings.simplefilter("ignore")
        hooked(2)
        assert len(caught) == 1
        warnings.simplefilter("error")
        with pytest.raises(FutureWarning, match="from a hooked method"):
            hooked(2)


def test_overlapping_catch_warnings_of_another_thread_heals_itself():
    """Before 3.14 ``catch_warnings`` is process-wide: an overlap that leaves the shim's catcher installed
    puts the user's filters and ``showwarning`` back at the next warning, which is shown."""
    from sdpa_shim._integration.guard import _CallerWarnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters, show = warnings.filters, warnings.showwarning
        catcher = _CallerWarnings(sys._getframe(0))
        catcher.__enter__()
        other = warnings.catch_warnings()  # "another thread", entered inside and left after the shim's
        other.__enter__()
        catcher.__exit__(None, None, None)
        other.__exit__(None, None, None)  # restores the shim's catcher
        warnings.warn("after the overlap", UserWarning, stacklevel=1)
        assert warnings.filters is filters and warnings.showwarning == show
    assert [str(w.message) for w in caught] == ["after the overlap"]


def test_paged_prefix_future_warning_points_where_it_would_without_the_shim():
    """transformers 5.23+ deprecates ``paged|sdpa`` with a FutureWarning raised in a hooked method."""
    from transformers import LlamaForCausalLM

    from helpers.models import tiny_llama_config

    def build() -> list[tuple[str, int]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = tiny_llama_config()
            config._attn_implementation = "paged|sdpa"
            try:
                LlamaForCausalLM(config)
            except ValueError:  # releases without paged attention
                return []
        return [(w.filename, w.lineno) for w in caught if "paged|" in str(w.message)]

    shimmed = build()
    if not shimmed:
        pytest.skip("this transformers release does not warn about the paged| prefix")
    assert shimmed == without_shim(build)
    assert not any(filename.startswith(str(SRC)) for filename, _ in shimmed)
