"""Package discovery for fedsilo, whose repository root is the package itself.

Everything else (metadata, dependencies, the ``fedsilo`` script) is in pyproject.toml.
pyproject alone cannot say "every package under the root, prefixed with ``fedsilo.``"
(setuptools' ``find`` names packages relative to where it looks), so this file does
that one thing: a new subpackage is shipped without anyone listing it. A folder is a
subpackage when it has an ``__init__.py``; the folders below never ship.
"""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# Top-level folders that are not part of the installed package, even if one day
# they hold an __init__.py (test helpers, examples, docs and the built site).
# benchmarks/reference/ (the measurements BENCHMARKS.md shows) is a plain folder of
# fedsilo.benchmarks that no package-data pattern matches, so it stays out too.
NOT_SHIPPED = ("tests", "examples", "docs", "site", "build", "dist")


class BuildPy(build_py):
    """build_py that leaves this file out: it sits in the package folder (the root)."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != ("fedsilo", "setup")]


setup(
    packages=["fedsilo"]
    + [f"fedsilo.{name}" for name in find_packages(where=".", exclude=[p for n in NOT_SHIPPED for p in (n, f"{n}.*")])],
    cmdclass={"build_py": BuildPy},
)
