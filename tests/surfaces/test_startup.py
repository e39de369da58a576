"""``SDPA_SHIM=1`` start-up activation: the ``.pth`` line, the PEP 829 entry point and the ``run``
sitecustomize in fresh interpreters, then the real thing in throwaway venvs where sdpa_shim is
installed as a wheel and in editable mode.

The venvs are built once per test session (``helpers.installs.installed``) and shared with test_cli,
test_notebooks, test_launchers and test_install.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

import sdpa_shim
from helpers import SRC
from helpers.expect import EXPECTED_IMPLEMENTATION
from helpers.fresh import clean_env, shim_warnings, source_env
from helpers.installs import (
    LOAD_FLASH,
    PTH_LINE,
    WARNING,
    Install,
    flash_attn_usable_here,
    installed,
    transformers_supported,
)
from sdpa_shim._surfaces import startup as _startup

# --------------------------------------------------------------------------- fresh interpreters, no install


def _run_code(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(
    ("value", "active"),
    [
        (None, False),
        ("", False),
        ("0", False),
        ("off", False),
        ("maybe", False),
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" On ", True),
        ("yes", True),
    ],
)
def test_pth_line_acts_only_on_true_values(value, active):
    env = source_env() if value is None else source_env(SDPA_SHIM=value)
    code = f"""
        import sys
        exec({PTH_LINE!r})
        loaded = "sdpa_shim" in sys.modules
        heavy = sorted(m for m in ("torch", "transformers", "wrapt") if m in sys.modules)
        print(loaded, loaded and sys.modules["sdpa_shim"].is_active(), heavy)
    """
    result = _run_code(code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(active), str(active), "[]"]
    if value == "maybe":  # a bad value is named once, with what is accepted and what is used
        assert result.stderr == (
            "sdpa_shim: SDPA_SHIM='maybe' is not valid; accepted values: 1/true/on/yes or 0/false/off/no "
            "(any case); using the default (as if unset)\n"
        )
    else:
        assert result.stderr == ""


@pytest.mark.parametrize(("value", "active"), [(None, False), ("0", False), ("1", True), ("Yes", True)])
def test_pep_829_entry_point_acts_only_on_true_values(value, active):
    """``sdpa_shim.start`` names an entry point that imports nothing of ours unless asked."""
    entry = next(
        line.strip()
        for line in (SRC / "sdpa_shim.start").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    env = source_env() if value is None else source_env(SDPA_SHIM=value)
    code = f"""
        import pkgutil, sys
        pkgutil.resolve_name({entry!r})()  # what site does with each .start entry (PEP 829)
        loaded = "sdpa_shim" in sys.modules
        print(loaded, loaded and sys.modules["sdpa_shim"].is_active())
    """
    result = _run_code(code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(active), str(active)]


def test_pth_line_never_raises_when_the_package_is_gone():
    """A stale .pth (package removed) must not break Python start: one line, no traceback."""
    result = _run_code(f"exec({PTH_LINE!r}); print('started')", clean_env(SDPA_SHIM="1"))
    assert result.returncode == 0
    assert result.stdout.strip() == "started"
    assert result.stderr.startswith("sdpa_shim: startup activation failed: ModuleNotFoundError")
    assert "Traceback" not in result.stderr


def test_startup_activate_never_raises(monkeypatch, caplog):
    def broken() -> bool:
        raise RuntimeError("boom")

    monkeypatch.setenv("SDPA_SHIM", "1")
    monkeypatch.setattr("sdpa_shim._integration.patch.activate", broken)
    assert _startup.activate() is False
    assert "start-up activation failed (RuntimeError: boom)" in caplog.text


def test_startup_activate_is_a_no_op_unless_asked(monkeypatch):
    sdpa_shim.deactivate()
    assert _startup.activate() is False
    assert not sdpa_shim.is_active()
    monkeypatch.setenv("SDPA_SHIM", "on")
    assert _startup.activate() is True
    assert sdpa_shim.is_active()


def test_sitecustomize_activates_and_chains_the_users_own(tmp_path):
    """The ``run`` fallback shadows sitecustomize; the user's one must still run, after ours."""
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    (user_dir / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = '1'\n")
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "sitecustomize.py").write_text(_startup.sitecustomize_source())
    code = """
        import os, sys
        print(os.environ.get("USER_SITECUSTOMIZE_RAN"), "sdpa_shim" in sys.modules and sys.modules["sdpa_shim"].is_active())
    """
    # Our package is not on PYTHONPATH: the sitecustomize must find it by itself.
    env = clean_env(SDPA_SHIM="1", PYTHONPATH=os.pathsep.join([str(ours), str(user_dir)]))
    result = _run_code(code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "True"]
    off = _run_code(code, clean_env(PYTHONPATH=os.pathsep.join([str(ours), str(user_dir)])))
    assert off.stdout.split() == ["1", "False"]


# --------------------------------------------------------------------------- real installs (throwaway venvs)


@pytest.fixture(scope="session", params=["wheel", "editable"])
def install(request, tmp_path_factory) -> Install:
    return installed(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def wheel_install(tmp_path_factory) -> Install:
    return installed("wheel", tmp_path_factory)


@pytest.mark.slow
def test_install_places_the_startup_files_in_site_packages(install):
    for name in ("sdpa_shim.pth", "sdpa_shim.start"):
        assert (install.site_packages / name).read_text() == (SRC / name).read_text()
    where = install.run(
        ["-c", "import sdpa_shim, _sdpa_shim_startup; print(sdpa_shim.__file__)"], clean_env()
    )
    assert where.returncode == 0, where.stderr
    location = Path(where.stdout.strip())
    if install.kind == "editable":
        assert location.is_relative_to(install.project / "src")
    else:
        assert location.is_relative_to(install.site_packages)
        with zipfile.ZipFile(install.wheel) as wheel:
            names = set(wheel.namelist())
        assert {"sdpa_shim.pth", "sdpa_shim.start", "_sdpa_shim_startup.py"} <= names


@pytest.mark.slow
def test_flash_request_works_and_warns_with_sdpa_shim_1(install, tiny_model_dir):
    if flash_attn_usable_here() or not transformers_supported():
        pytest.skip("needs an unusable flash-attn and a transformers release the core hooks")
    check = LOAD_FLASH + textwrap.dedent("""
        import sdpa_shim  # a later import must not activate or wrap a second time
        from sdpa_shim._integration import ledger
        wrappers = [vars(c.target())[c.name] for c in ledger.changes("hooks")]
        print("wrapped:", len(wrappers) > 0, "double wrapped:", any(isinstance(w.__wrapped__, type(w)) for w in wrappers))
        print("activated at start:", sdpa_shim._surfaces.startup.activated_at_startup())
    """)
    result = install.run(["-c", check, str(tiny_model_dir)], clean_env(SDPA_SHIM="1"))
    assert result.returncode == 0, result.stderr
    assert f"attention: {EXPECTED_IMPLEMENTATION}" in result.stdout
    assert "shim loaded: True" in result.stdout
    assert "wrapped: True double wrapped: False" in result.stdout
    assert "activated at start: True" in result.stdout
    assert shim_warnings(result.stderr) == [WARNING]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unset", "off-then-import"])
def test_without_sdpa_shim_1_transformers_answers(wheel_install, tiny_model_dir, case):
    if flash_attn_usable_here():
        pytest.skip("flash-attn is usable here: transformers would not fail")
    if case == "unset":
        result = wheel_install.run(["-c", LOAD_FLASH, str(tiny_model_dir)], clean_env())
    else:
        code = "import sdpa_shim\n" + LOAD_FLASH
        result = wheel_install.run(["-c", code, str(tiny_model_dir)], clean_env(SDPA_SHIM="0"))
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "FlashAttention2 has been toggled on" in result.stderr or "flash_attn" in result.stderr
    assert shim_warnings(result.stderr) == []


def _startup_ms(python: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([str(python), "-c", "pass"], check=True, env=env)
    return (time.perf_counter() - start) * 1000


#: What a user would notice, with wide margins for shared CI machines (measured on the 2-core box with
#: transformers 5.25: the .pth line, compiled and run by ``exec``, 23 us; SDPA_SHIM=1 4 ms over an unset
#: start): the line costing what an import costs, or an activation importing torch or transformers (a second
#: or more).
PTH_LINE_LIMIT_US = 500
ACTIVATION_LIMIT_MS = 500


def _report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Show ``line`` in pytest's output even without ``-s`` (the measurement the README quotes)."""
    with capsys.disabled():
        print(line)


@pytest.mark.slow
def test_startup_cost_stays_small(wheel_install, capsys, record_testsuite_property):
    """Measured, reported, and bounded loosely: timings on shared CI machines are too noisy for a tight
    gate. Unset and set runs alternate, so a change in machine load shifts both alike."""
    runs = 15
    unset_env, on_env = clean_env(), clean_env(SDPA_SHIM="1")
    for env in (unset_env, on_env):  # warm the file cache
        _startup_ms(wheel_install.python, env)
    samples: dict[str, list[float]] = {"unset": [], "on": []}
    for _ in range(runs):
        samples["unset"].append(_startup_ms(wheel_install.python, unset_env))
        samples["on"].append(_startup_ms(wheel_install.python, on_env))
    unset, on = statistics.median(samples["unset"]), statistics.median(samples["on"])
    # The .pth line itself, with SDPA_SHIM unset: what every Python start pays for the shim.
    code = (
        f"import time\nt = time.perf_counter()\nfor _ in range(10000): exec({PTH_LINE!r})\n"
        "print((time.perf_counter() - t) / 10000 * 1e6)"
    )
    line_us = float(wheel_install.run(["-c", code], clean_env()).stdout)
    record_testsuite_property("startup_ms_unset", round(unset, 2))
    record_testsuite_property("startup_ms_sdpa_shim_1", round(on, 2))
    record_testsuite_property("pth_line_us_unset", round(line_us, 2))
    _report(
        capsys,
        f"\nstart-up cost (python -c pass, median of {runs}): SDPA_SHIM unset {unset:.1f} ms, "
        f"SDPA_SHIM=1 {on:.1f} ms ({on - unset:+.1f} ms); the .pth line unset: {line_us:.2f} us",
    )
    assert line_us < PTH_LINE_LIMIT_US, f"the .pth line costs {line_us:.1f} us on every Python start"
    assert on - unset < ACTIVATION_LIMIT_MS, f"SDPA_SHIM=1 adds {on - unset:.0f} ms to every Python start"
    # Activation at start-up leaves torch and transformers to the user's first import.
    heavy = "import sys; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    started = wheel_install.run(["-c", heavy], on_env)
    assert (started.returncode, started.stdout.strip()) == (0, "[]"), started.stderr
