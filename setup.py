"""Build hook: a wheel (and so the Debian package) carries the compiled BPF object.

Metadata lives in pyproject.toml; this file only adds one step to build_py. The object is
compiled from bpf/ with clang into the build tree beside the packaged sources (guard/bpf), for
both byte orders (see guard/kernel/objects.py), so an installed portguard
loads it with no compiler and no libbpf-dev on the host. Editable installs (source checkouts)
skip it: there `portguard build` fills /var/cache/portguard.
"""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent))


class build_py_with_bpf_object(build_py):  # noqa: N801 (setuptools' command naming)
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        from guard.kernel import objects

        shipped = Path(self.build_lib) / "guard" / "bpf"
        try:
            for target in objects.TARGETS.values():
                built = objects.build(target, shipped)
                print(f"portguard: compiled {built}")
        except objects.BuildError as exc:
            sys.exit(f"building portguard compiles its BPF object: {exc}")


setup(cmdclass={"build_py": build_py_with_bpf_object})
