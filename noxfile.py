"""The transformers version matrix: the whole test suite against every supported release, CPU torch 2.13.0.

    python3 -m venv .venv && . .venv/bin/activate  # a venv (PEP 668 systems refuse a system-wide pip)
    python -m pip install torch==2.13.0 nox     # once
    python -m nox -s newest                     # start here: the newest release only, about 5 minutes
    python -m nox                               # what CI runs: every release in RELEASES, then latest
    python -m nox -s "tests(transformers='4.46')"   # one release
    python -m nox -s newest -- -x tests/core/test_policy.py  # arguments after -- go to pytest
    python -m nox -r ...                        # re-use the environments of an earlier run
    python -m nox -s latest                     # the newest transformers on the package index (also in CI)
    python -m nox -s torch_next                 # the newest release on torch TORCH_NEXT (by hand, not CI)

What CI runs: ``.ci/run`` makes a fresh venv and runs the README's test command, ``python -m pip install
torch==2.13.0 nox && python -m nox``: ``nox.options.sessions``, i.e. the releases in ``CI_RELEASES`` (the
oldest and newest and each band's edges: 4.36, 4.44, 4.46, 4.48, 4.53, 4.54, 4.55, 4.56, 5.0, 5.4, 5.25),
then ``latest``. The whole matrix (``python -m nox -s tests``, every release in ``RELEASES``) measured 2918 s
(48.6 min) on the 2-core box (this round's ``.ci/run``: fresh clone, empty pip cache, all 17 releases
passing, sessions 1-4 minutes, 5.25 8 minutes): over the 45 minutes CI is kept under, so it runs on demand
(before a release, after a change to the hooks). The six releases left out took 17 of those minutes:
``python -m nox`` is about 32 minutes cold. Not in CI either: ``newest`` (its release is in the set) and
``torch_next`` (by hand, below).

Why it is built this way (2 cores, clean box, under 45 minutes):

* torch is installed once, next to nox (in the venv or interpreter that runs ``python -m nox``), and
  shared. Each session venv is made from the base interpreter with ``--system-site-packages``: when
  torch is in the base, the session sees it. When it is elsewhere (nox runs in a venv), torch and its
  run-time requirements are hard-linked from there into the session's site-packages (about 20,000
  files, 1 s, no disk; installing torch into each session instead costs 22 s and 750 MB per session,
  measured). A path file naming the venv's site-packages would cost nothing too, but it also shows
  the session everything else installed there (nox's own requirements), so pip skips those in the
  session and the venvs tests build from the session's site-packages miss them (measured: the
  notebook kernel lost platformdirs). Each release's transformers, tokenizers, huggingface_hub and
  test tools are installed into the session's own venv. A constraint file pins torch==2.13.0 so pip
  can never pull a CUDA build. A missing or wrong torch stops nox before any session starts, with one
  line naming the command that fixes it.
* pip's wheel cache (the default ``~/.cache/pip``) is shared by all sessions: only the first download costs.
* sdpa_shim itself is not installed: ``PYTHONPATH=src`` (the install tests build their own throwaway venvs
  and check that the test interpreter has no start-up file).
* Every session runs ``tests/``; files for features a release does not have skip themselves with a
  reason. Files listed in RELEASE_INDEPENDENT run only in the newest release's session, so the matrix
  runs twice only what depends on the release.
* A release that cannot be installed or imported goes into UNSUPPORTED with the reason: its session is
  reported as skipped with that reason, and ``docs/versions.md`` (checked by
  tests/integration/test_versions_table.py) shows it. An unexpected install failure fails the session; it
  is never skipped silently.

Measured (second session, after TRL, continuous-batching and flash-path tests were added): the whole
``bash .ci/run`` (fresh clone, fresh venv, README command, 16 sessions, 5.24 newest) on the 2-core box,
warm pip cache: 2139 s (35.7 min) wall, with other work sharing the CPU at times. Sessions took 1-3
minutes each, the newest 5 minutes. Five sessions failed in that run on test expectations fixed right after
it (versions-table row for bands A-B, TRL's loss averaging on 5.0/5.4, 5.4 import order), each re-checked
on its release; the first session's earlier measurement was 2549 s (42.5 min) with a notebook failure.
A cold pip cache adds the downloads (not measured). Measured with 5.25 by a newcomer on the same box while
it was shared with other work: 9 of 16 sessions in 40 minutes (about 70 projected), ``newest`` 5 minutes
(492 passed): on a shared box the matrix does not fit 45 minutes.

With 5.25 (17 sessions, the newest now 5.25) and ``latest`` (seconds while the matrix is current, one
release-dependent suite run, about 3 minutes, while it is behind) CI is estimated (not measured) near 40.
``torch_next`` measured once (5.25.0 on torch 2.14.1+cu130, the whole suite: 505 passed, 93 skipped,
1 xfailed, the counts of ``newest`` on 2.13.0): 877 s wall, of which 648 s pytest and about 230 s making the
venv and installing torch's CUDA build from the local index; its venv takes 7.7 GB of disk. Measured with
``newest`` running beside it on the same 2 cores (820 s there, about 5 minutes alone), so alone about
8 minutes: 35.7 + 3 (5.25) + 8 is over 45, hence by hand, not in CI.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import nox

#: minor -> the release tested (the latest patch of that minor). Keep docs/versions.md in step:
#: ``python tests/integration/test_versions_table.py --write`` regenerates it, and the test fails when it
#: drifts.
RELEASES: dict[str, str] = {
    "4.36": "4.36.2",
    "4.40": "4.40.2",
    "4.44": "4.44.2",
    "4.46": "4.46.3",
    "4.48": "4.48.3",
    "4.51": "4.51.3",
    "4.53": "4.53.3",
    "4.54": "4.54.1",
    "4.55": "4.55.4",
    "4.56": "4.56.2",
    "4.57": "4.57.6",
    "5.0": "5.0.0",
    "5.4": "5.4.0",
    "5.12": "5.12.1",
    "5.23": "5.23.0",
    "5.24": "5.24.0",
    "5.25": "5.25.0",
}
#: minor -> why that release cannot be installed or imported here (torch 2.13.0 CPU, Python 3.11).
UNSUPPORTED: dict[str, str] = {}
NEWEST = "5.25"
#: Test files whose subject does not depend on the transformers release (pure policy, the stand-in's
#: numerics, CLI / start-up / launcher / notebook / packaging plumbing): they run once, in the newest
#: release's session, and every other session ignores them. Everything about attention selection runs
#: everywhere.
RELEASE_INDEPENDENT = (
    "tests/core/test_policy.py",
    "tests/standin/test_standin.py",
    "tests/runtime/test_varlen_engine.py",
    "tests/runtime/test_flex_route.py",
    "tests/surfaces/test_cli.py",
    "tests/surfaces/test_startup.py",
    "tests/end_to_end/test_launchers.py",
    "tests/end_to_end/test_notebooks.py",
    "tests/end_to_end/test_install.py",
    # the README's example outputs are those of the newest release (it skips itself before 4.56)
    "tests/surfaces/test_readme.py",
)

TORCH = "2.13.0"
#: The test extra of pyproject.toml (less ruff) plus what the install tests build wheels with
#: (pyproject's build requirements, used there with --no-build-isolation).
TEST_DEPENDENCIES = (
    "wrapt>=1.14,!=2.2.0",
    "pytest>=7",
    "hypothesis>=6",
    "packaging",
    "accelerate",
    "setuptools>=77",
    "wheel",
)
#: For release-independent files, so installed in the newest session only: a real Jupyter kernel
#: (tests/end_to_end/test_notebooks.py), and the publishing tools (tests/end_to_end/test_install.py: sdist +
#: wheel, twine check).
NEWEST_DEPENDENCIES = ("nbclient", "nbformat", "ipykernel", "build", "twine")
#: A real client of padding-free training (tests/end_to_end/test_trl.py), in every session whose release it
#: supports:
#: TRL 1.16 (the first that trains on a Triton-less CPU torch with 5.x) needs transformers 4.56.2+.
TRL_DEPENDENCIES = ("trl==1.16.0", "datasets")
TRL_FIRST_RELEASE = (4, 56)
ROOT = Path(__file__).resolve().parent
#: The next torch (``torch_next``): a CUDA build from the package index, run on the CPU.
TORCH_NEXT = "2.14.1"
#: Matrix bookkeeping that a release outside the matrix fails by definition (no row in docs/versions.md yet).
MATRIX_ONLY = ("tests/integration/test_versions_table.py",)

#: What ``python -m nox`` (and so CI, ``.ci/run``) runs on every commit: the oldest and the newest release
#: and each band's edges, then the newest release on the index (``latest``). The whole matrix measured 48.6
#: minutes cold on the 2-core box, over CI's 45; this set about 32. The whole matrix: ``nox -s tests``.
CI_RELEASES = ("4.36", "4.44", "4.46", "4.48", "4.53", "4.54", "4.55", "4.56", "5.0", "5.4", NEWEST)
assert set(CI_RELEASES) <= set(RELEASES), "CI_RELEASES names a release the matrix does not have"
nox.options.sessions = [f"tests(transformers='{minor}')" for minor in CI_RELEASES] + ["latest"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True


def _fix(problem: str) -> str:
    """One line: what is wrong and the command that fixes it."""
    python = shlex.quote(sys.executable)
    return f"noxfile: {problem}; run: {python} -m pip install torch=={TORCH}"


def _torch_site() -> Path:
    """The site-packages directory where the interpreter running nox finds torch, checked to be
    torch==TORCH. torch is not imported (that takes seconds); a problem exits with one line."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(_fix(f"torch is not installed for {sys.executable}, the Python running nox"))
    site_dir = Path(next(iter(spec.submodule_search_locations))).resolve().parent
    versions = [
        dist.version
        for dist in importlib.metadata.distributions(path=[str(site_dir)])
        if (dist.metadata["Name"] or "").lower() == "torch"
    ]
    version = versions[0] if versions else "of unknown version"
    if version.split("+")[0] != TORCH:
        sys.exit(_fix(f"torch {version} is installed in {site_dir}; the test matrix needs torch=={TORCH}"))
    return site_dir


def _listing_only() -> bool:
    """``nox -l`` / ``--json`` only lists sessions: no torch needed for that."""
    return any(arg in ("-l", "--list", "--list-sessions", "--json") for arg in sys.argv[1:])


#: Checked once, when nox loads this file: before any session creates or installs anything.
TORCH_SITE = None if _listing_only() else _torch_site()

#: Run in each session venv with where torch must come from: the pinned release, from there?
CHECK_TORCH = (
    "import sys, torch; from pathlib import Path; v = torch.__version__; "
    "where = Path(torch.__file__).resolve().parent.parent; "
    f"sys.exit(None if v.split('+')[0] == {TORCH!r} and where == Path(sys.argv[1]) else "
    "f'the session venv sees torch {v} in {where}, expected {sys.argv[1]}: delete .nox, run nox again')"
)


def _base_python() -> str:
    """The base interpreter, even when nox itself runs in a venv (a venv made from a venv is made from
    the base anyway); the session venvs see its site-packages (``--system-site-packages``)."""
    for name in ("python3", "python"):
        candidate = Path(sys.base_prefix, "bin", name)
        if candidate.exists():
            return str(candidate)
    return sys.executable


def _torch_distributions() -> list[importlib.metadata.Distribution]:
    """torch and what it needs at run time (its requirement closure), as installed in TORCH_SITE.
    Requirements installed elsewhere (the base interpreter) are visible to the sessions anyway."""
    from packaging.requirements import Requirement  # a dependency of nox
    from packaging.utils import canonicalize_name

    assert TORCH_SITE is not None
    here = {
        canonicalize_name(dist.metadata["Name"]): dist
        for dist in importlib.metadata.distributions(path=[str(TORCH_SITE)])
        if dist.metadata["Name"]
    }
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = ["torch"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found or name not in here:
            continue
        found[name] = here[name]
        for line in here[name].requires or ():
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def _link_torch(purelib: Path) -> int:
    """Hard-link torch and its requirement closure from TORCH_SITE into the session's site-packages
    (a copy across file systems). Returns the number of files. pip treats them as installed in the
    session; replacing one there unlinks only the session's name, never the original."""
    from packaging.utils import canonicalize_name

    assert TORCH_SITE is not None
    # what the venv came with (pip, setuptools): left to pip, never overlaid file by file
    present = {
        canonicalize_name(dist.metadata["Name"] or "")
        for dist in importlib.metadata.distributions(path=[str(purelib)])
    }
    count = 0
    for dist in _torch_distributions():
        if canonicalize_name(dist.metadata["Name"]) in present:
            continue
        for entry in dist.files or ():
            relative = Path(entry)
            if ".." in relative.parts or relative.is_absolute():  # console scripts in bin/: not needed
                continue
            source, target = TORCH_SITE / relative, purelib / relative
            if not source.is_file() or target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
            count += 1
    return count


def _share_torch(session: nox.Session) -> None:
    """Give the session venv the very torch nox's interpreter has, wherever that was installed.

    torch in the base interpreter: the venv sees it (``--system-site-packages``). torch in a venv
    (or anywhere else the session does not see): torch and its run-time requirements are hard-linked
    into the session's own site-packages: no download, no copy, about a second. They are then
    really installed there, so pip installs everything else the session needs into the session, and
    venvs that tests build from the session's site-packages see them too. Nothing else of nox's
    environment (nox, virtualenv, platformdirs, ...) leaks into the session.
    """
    assert TORCH_SITE is not None
    probe = "import json, sys, sysconfig; print(json.dumps([sysconfig.get_paths()['purelib'], sys.path]))"
    # run_install: also with --install-only; None when --no-install re-uses the venv as it was left
    output = session.run_install("python", "-c", probe, silent=True)
    if output is None:
        return
    purelib, path = json.loads(str(output).strip().splitlines()[-1])
    purelib = Path(purelib).resolve()
    expected = TORCH_SITE
    if TORCH_SITE not in {Path(entry).resolve() for entry in path if entry}:
        expected = purelib
        if not (purelib / "torch" / "__init__.py").exists():
            start = time.perf_counter()
            files = _link_torch(purelib)
            session.log(
                f"torch: {files} files linked from {TORCH_SITE} in {time.perf_counter() - start:.1f} s"
            )
    session.run_install("python", "-c", CHECK_TORCH, str(expected), silent=True)


def _install_and_run(
    session: nox.Session,
    release: str,
    *,
    everything: bool,
    torch: str = TORCH,
    ignore: tuple[str, ...] = (),
) -> None:
    """Install transformers ``release`` (and the test tools) into the session and run tests/ on it.

    ``everything``: also the RELEASE_INDEPENDENT files (and what they need); ``torch``: the torch the
    session must see (TORCH is shared from nox's interpreter; another is installed into the session).
    """
    constraints = Path(session.create_tmp()) / "constraints.txt"
    constraints.write_text(f"torch=={torch}\n")  # no requirement may pull another (CUDA) build
    if torch == TORCH:
        _share_torch(session)
    else:
        session.install("--constraint", str(constraints), f"torch=={torch}")
        check = "import sys, torch; "
        check += "v = torch.__version__; sys.exit(None if v.split('+')[0] == sys.argv[1] else v)"
        session.run("python", "-c", check, torch, silent=True)
    minor = tuple(int(part) for part in release.split(".")[:2])
    session.install(
        "--constraint",
        str(constraints),
        f"transformers=={release}",
        *TEST_DEPENDENCIES,
        *(NEWEST_DEPENDENCIES if everything else ()),
        *(TRL_DEPENDENCIES if minor >= TRL_FIRST_RELEASE else ()),
    )
    session.run(
        "python",
        "-c",
        "import torch, transformers; from transformers import LlamaForCausalLM; "
        "print('transformers', transformers.__version__, 'torch', torch.__version__)",
    )
    env = {
        "PYTHONPATH": str(ROOT / "src"),
        # tests/integration/test_versions_table.py checks it is what got installed
        "SDPA_SHIM_MATRIX_RELEASE": release,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    skipped = [*ignore, *(() if everything else RELEASE_INDEPENDENT)]
    # session.posargs (after ``--``) go to pytest: test files, -x, -k ...
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        *[f"--ignore={path}" for path in skipped],
        *session.posargs,
        env=env,
    )


def _run_suite(session: nox.Session, minor: str) -> None:
    if minor in UNSUPPORTED:
        session.skip(f"transformers {minor} is unsupported: {UNSUPPORTED[minor]}")
    _install_and_run(session, RELEASES[minor], everything=minor == NEWEST)


@nox.session(python=_base_python(), venv_params=["--system-site-packages"], tags=["matrix"])
@nox.parametrize("transformers", list(RELEASES))
def tests(session: nox.Session, transformers: str) -> None:
    """The whole test suite against one transformers release (every release: the matrix)."""
    _run_suite(session, transformers)


@nox.session(python=_base_python(), venv_params=["--system-site-packages"])
def newest(session: nox.Session) -> None:
    """Fast dev loop: the whole test suite against the newest release only."""
    _run_suite(session, NEWEST)


def _newest_on_index() -> tuple[str | None, str]:
    """The newest transformers release on the package index pip is configured with (``pip index versions``,
    pre-releases excluded), or None and why not."""
    import re
    import subprocess

    command = [
        sys.executable,
        "-m",
        "pip",
        "index",
        "versions",
        "transformers",
        "--disable-pip-version-check",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"{shlex.join(command)} failed: {error}"
    found = re.search(r"^transformers \(([^)]+)\)", result.stdout, re.MULTILINE)
    if result.returncode != 0 or found is None:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"{shlex.join(command)} exited {result.returncode}: {detail[0]}"
    return found.group(1), ""


@nox.session(python=_base_python(), venv_params=["--system-site-packages"])
def latest(session: nox.Session) -> None:
    """The newest transformers on the package index, resolved now: a release not yet in RELEASES is tried
    without editing the matrix. Prints the release it found; when that is already the matrix's release of its
    minor, the matrix has run it and nothing runs again (one index query, seconds).

    In CI (``nox.options.sessions``) because that is where a new release is noticed first; it costs seconds
    while the matrix is current, and one suite run (about 3 minutes, release-dependent files only) while it
    is behind, within the 45 minutes. Its failure does NOT fail CI by default: CI's verdict is about the
    commit and the releases it declares (RELEASES), and the same commit must not turn red because PyPI moved.
    The failure is printed as ``latest: transformers X FAILS ...`` with what to do (docs/versions.md, "Adding
    a release"). ``SDPA_SHIM_LATEST_STRICT=1`` makes it fail the run (a scheduled job that should go red).
    An index that cannot be reached is a skip with the reason (or a failure when strict).
    """
    strict = os.environ.get("SDPA_SHIM_LATEST_STRICT", "") == "1"
    release, why = _newest_on_index()
    if release is None:
        message = f"latest: the package index could not be asked for the newest transformers: {why}"
        session.error(message) if strict else session.skip(message)
    minor = ".".join(release.split(".")[:2])
    session.log(f"latest: the newest transformers on the index is {release}")
    if RELEASES.get(minor) == release:
        session.skip(
            f"latest: transformers {release} is in the matrix (tests(transformers={minor!r})): not run again"
        )
    try:
        # the matrix bookkeeping (docs/versions.md rows) fails for any release outside RELEASES by definition
        _install_and_run(session, release, everything=False, ignore=MATRIX_ONLY)
    except nox.command.CommandFailed:
        message = (
            f"latest: transformers {release} FAILS (see above); it is not in the matrix: add it to RELEASES "
            "and fix (docs/versions.md, 'Adding a release')"
        )
        if strict:
            session.error(message)
        session.warn(f"{message}. Not failing CI (SDPA_SHIM_LATEST_STRICT=1 would).")
        return
    session.log(
        f"latest: transformers {release} passes; add it to RELEASES (docs/versions.md, 'Adding a release')"
    )


@nox.session(python=_base_python())
def torch_next(session: nox.Session) -> None:
    """The newest release of the matrix on the next torch (TORCH_NEXT, a CUDA build run on the CPU), the
    whole suite. Not in CI: about 8 minutes alone and 7.7 GB of disk (module docstring), which does not fit
    the 45 minutes with the matrix. Run it by hand when the torch runtime changes (src/sdpa_shim/_runtime,
    standin, backend policy), before a release, and when TORCH_NEXT moves: ``python -m nox -s torch_next``."""
    _install_and_run(session, RELEASES[NEWEST], everything=True, torch=TORCH_NEXT)
