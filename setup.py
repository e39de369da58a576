"""Build glue for the interpreter-start files; all metadata lives in pyproject.toml.

``sdpa_shim.pth`` (and its PEP 829 twin ``sdpa_shim.start``) must land at the root of
site-packages, next to the packages, for ``site`` to read them. setuptools has no declarative way to
put a file there, and its PEP 660 editable wheels skip ``build_lib`` altogether, so ``build_py``
copies the two files:

* regular wheel: into ``build_lib``, whose root becomes the wheel root (purelib);
* editable wheel: into the unpacked editable wheel (``install_lib`` while ``editable_wheel`` runs,
  written into the wheel with the rest), so ``pip install -e .`` installs them too.

``sdist`` adds them to source distributions, so a wheel built from the sdist still has them.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py
from setuptools.command.sdist import sdist as _sdist

SOURCE_DIR = "src"
STARTUP_FILES = ("sdpa_shim.pth", "sdpa_shim.start")


class build_py(_build_py):
    """build_py that also places the startup files at the root of the (editable) wheel."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            target = self.get_finalized_command("install").install_lib  # the unpacked editable wheel
        else:
            target = self.build_lib
        for name in STARTUP_FILES:
            self.copy_file(os.path.join(SOURCE_DIR, name), os.path.join(target, name))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs += [os.path.join(self.build_lib, name) for name in STARTUP_FILES]
        return outputs


class sdist(_sdist):
    """sdist that ships the startup files, which are neither package data nor modules."""

    def make_distribution(self) -> None:
        self.filelist.extend(os.path.join(SOURCE_DIR, name) for name in STARTUP_FILES)
        super().make_distribution()


setup(cmdclass={"build_py": build_py, "sdist": sdist})
