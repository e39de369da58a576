"""Interpreter-start activation: the one function every start-up surface calls.

Three surfaces lead here, all only when ``SDPA_SHIM`` is a true value: the ``sdpa_shim.pth`` line
(every Python up to 3.17), the PEP 829 ``sdpa_shim.start`` entry point (3.15+; a matching ``.start``
file switches the ``.pth`` import line off) and the ``sitecustomize`` that ``sdpa-shim run`` puts on
``PYTHONPATH`` when neither file is installed. Start-up code runs before the user's first line, so
it must never raise and never import torch or transformers; ``import sdpa_shim`` already honours
both (wrapt waits for ``import transformers``).

This module also answers "is start-up activation installed here?" for ``doctor`` and ``run``.
"""

from __future__ import annotations

import os
import site
import sys

from .._core.settings import ENV_ENABLED, get_logger, is_true

TYPE_CHECKING = False  # on the start-up path: only os, site and sys (already loaded) at run time
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

PTH_NAME = "sdpa_shim.pth"
START_NAME = "sdpa_shim.start"
#: First Python whose ``site`` reads PEP 829 ``.start`` files.
PEP_829_PYTHON = (3, 15)

_activated_at_startup = False


def requested(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``SDPA_SHIM`` asks for start-up activation (1/true/on/yes, any case, no warning)."""
    env = os.environ if environ is None else environ
    return is_true(ENV_ENABLED, env.get(ENV_ENABLED))


def activate() -> bool:
    """Turn the shim on if ``SDPA_SHIM`` says so. Never raises; returns whether the shim is on.

    Importing this module has already run ``sdpa_shim/__init__.py`` (which activates); calling the
    idempotent ``activate()`` again keeps this entry correct on its own and records that the shim
    came on at start-up, which ``doctor`` reports.
    """
    global _activated_at_startup
    try:
        if not requested():
            return False
        from .._integration.patch import activate as activate_shim

        active = activate_shim()
        _activated_at_startup = _activated_at_startup or active
        return active
    except Exception as exc:  # start-up must go on whatever happens here
        get_logger().warning("start-up activation failed (%s: %s); the shim is off", type(exc).__name__, exc)
        return False


def activated_at_startup() -> bool:
    """True when a start-up surface switched the shim on in this process."""
    return _activated_at_startup


def site_directories() -> list[str]:
    """The directories whose ``.pth``/``.start`` files ``site`` reads for this interpreter."""
    directories: list[str] = []
    getsitepackages = getattr(site, "getsitepackages", None)  # missing from some embedded ``site`` modules
    if getsitepackages is not None:
        directories.extend(getsitepackages())
    if site.ENABLE_USER_SITE:
        directories.append(site.getusersitepackages())
    seen: set[str] = set()
    unique = []
    for directory in directories:
        key = os.path.normcase(os.path.abspath(directory))
        if key not in seen:
            seen.add(key)
            unique.append(directory)
    return unique


def installed_startup_files() -> list[str]:
    """Every ``sdpa_shim.pth`` and ``sdpa_shim.start`` in this interpreter's site directories."""
    found = []
    for directory in site_directories():
        for name in (PTH_NAME, START_NAME):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                found.append(path)
    return found


def startup_installed(files: list[str] | None = None) -> bool:
    """True when this interpreter will run one of our start-up files on its next start."""
    if sys.flags.no_site:
        return False
    names = {os.path.basename(path) for path in (installed_startup_files() if files is None else files)}
    if START_NAME in names and sys.version_info >= PEP_829_PYTHON:
        return True
    # PEP 829: ``.pth`` import lines are honoured up to 3.17, then ignored.
    return PTH_NAME in names and sys.version_info < (3, 18)


_SITECUSTOMIZE = '''\
"""Written by ``sdpa-shim run``: activates sdpa_shim at start, then runs the user's sitecustomize."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE_PARENT = {package_parent!r}


def _activate():
    if os.environ.get("SDPA_SHIM", "").strip().lower() not in ("1", "true", "on", "yes"):
        return
    try:
        try:
            import sdpa_shim._surfaces.startup as startup
        except ImportError:
            sys.path.append(_PACKAGE_PARENT)
            import sdpa_shim._surfaces.startup as startup
        startup.activate()
    except Exception as exc:
        sys.stderr.write("sdpa_shim: start-up activation failed: %r\\n" % (exc,))


def _chain():
    """Run the sitecustomize this one shadows, as Python would have without us."""
    import importlib.machinery
    import importlib.util

    here = os.path.normcase(_HERE)
    path = [p for p in sys.path if os.path.normcase(os.path.abspath(p or os.curdir)) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_activate()
_chain()
'''


def sitecustomize_source() -> str:
    """The ``sitecustomize.py`` that ``run`` uses where no start-up file is installed."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    return _SITECUSTOMIZE.format(package_parent=package_parent)


def sitecustomize_location(source: str | None = None) -> str:
    """Where ``run`` writes its ``sitecustomize.py`` (nothing is written here): the per-user cache,
    ``$XDG_CACHE_HOME/sdpa_shim/sitecustomize-<hash>/`` (default ``~/.cache/...``); the hash names the
    file's content, so each sdpa_shim version and checkout gets its own directory."""
    import hashlib

    text = sitecustomize_source() if source is None else source
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    cache_root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_root, "sdpa_shim", f"sitecustomize-{digest}")


def sitecustomize_directory() -> Path:
    """A directory holding our ``sitecustomize.py``, to prepend to ``PYTHONPATH``.

    ``run`` replaces itself with the command (exec), so the directory must outlive it: it is a
    per-user, content-addressed cache entry, reused by later runs; a fresh private temp directory
    is the fallback when the cache cannot be written.
    """
    import tempfile
    from pathlib import Path

    source = sitecustomize_source()
    directory = Path(sitecustomize_location(source))
    try:
        target = directory / "sitecustomize.py"
        if not (target.is_file() and target.read_text() == source):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            partial = directory / f".sitecustomize-{os.getpid()}.tmp"
            partial.write_text(source)
            os.replace(partial, target)
        return directory
    except OSError:
        get_logger(__name__).debug("cannot write %s; using a temporary directory", directory, exc_info=True)
    fallback = Path(tempfile.mkdtemp(prefix="sdpa_shim-run-"))
    (fallback / "sitecustomize.py").write_text(source)
    return fallback
