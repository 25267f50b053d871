"""Build hook: ship the agent's startup hook as a top-level ``.pth`` file.

Python runs ``import`` lines of ``.pth`` files in site-packages at every interpreter start;
``livepatch-agent.pth`` starts the agent when LIVEPATCH_AGENT is set (see
``livepatch.agent.boot``), so gunicorn workers and subprocesses of a patched program come
up with agents. setuptools has no declarative way to place a file at the root of
site-packages, hence this hook. Editable installs do not carry it: ``scripts/make-venv``
copies it into the development venvs.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "livepatch-agent.pth"
SOURCE = os.path.join("src", "livepatch", "_startup", PTH)


class build_py_with_pth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(SOURCE, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": build_py_with_pth})
