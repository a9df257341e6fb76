"""Build hook (the project's metadata is in pyproject.toml).

The guest sources live once, in the top-level ``firmware/`` and ``guestcode/`` folders. A built
wheel carries them as package data: ``build_py`` copies them into ``x86shadow/_data/`` of the build
tree (x86shadow/resources.py looks there first). MANIFEST.in puts them in the sdist, so a wheel
built from the sdist has them too. An editable install (``pip install -e .``) copies nothing: the
package finds them beside itself in the checkout.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST_DIRS = ("firmware", "guestcode")
DATA_PACKAGE_DIR = os.path.join("x86shadow", "_data")


def _guest_files():
    """(source path, path relative to x86shadow/_data) of every guest source file."""
    out = []
    for top in GUEST_DIRS:
        root = os.path.join(HERE, top)
        if not os.path.isdir(root):
            raise SystemExit(f"setup.py: {root} is missing: the guest sources must be in the "
                             f"source tree (and MANIFEST.in must put them in the sdist)")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames
                                 if not d.startswith(".") and d != "__pycache__")
            for name in sorted(filenames):
                if name.startswith(".") or name.endswith((".pyc", ".pyo", "~")):
                    continue
                src = os.path.join(dirpath, name)
                out.append((src, os.path.relpath(src, HERE)))
    return out


class build_py(_build_py):
    """setuptools' build_py, plus firmware/ and guestcode/ copied to x86shadow/_data/."""

    def _guest_outputs(self):
        """{output path in the build tree: source path}"""
        return {os.path.join(self.build_lib, DATA_PACKAGE_DIR, rel): src
                for src, rel in _guest_files()}

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):      # setuptools copies nothing then either
            return
        for dst, src in self._guest_outputs().items():
            self.mkpath(os.path.dirname(dst))
            self.copy_file(src, dst, preserve_mode=False)

    # (listed in editable mode too, like setuptools' own package data: a strict editable install
    # links them; the default one ignores the list)
    def get_outputs(self, include_bytecode=True):
        return list(super().get_outputs(include_bytecode)) + list(self._guest_outputs())

    def get_output_mapping(self):
        return {**super().get_output_mapping(), **self._guest_outputs()}


setup(cmdclass={"build_py": build_py})
