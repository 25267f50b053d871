"""New instance attributes in real code: stdlib modules of one Python built against the next.

Between 3.11, 3.12 and 3.13, CPython gave some classes a new attribute in ``__init__`` and
read it in methods that changed too. A live patch of such a method would raise
``AttributeError`` on every instance made before it, so ``livepatch build`` must refuse
each of these reads, by name. The stdlib of each version is read as source from that
interpreter's installation (found as ``make test`` finds interpreters); nothing is
imported.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from livepatch.build import BuildRefused, build_result
from livepatch.build.refusal import Reason

ROOT = Path(__file__).resolve().parents[2]

#: (old version, new version, module, the reads that must be refused as method:attribute)
CASES = [
    ("3.11", "3.12", "reprlib", {"Repr._join:indent", "Repr._repr_iterable:indent"}),
    ("3.11", "3.12", "tempfile", {"_TemporaryFileCloser.close:delete_on_close",
                                  "TemporaryDirectory.__exit__:_delete"}),
    ("3.12", "3.13", "queue", {"Queue.put:is_shutdown", "Queue.get:is_shutdown"}),
    ("3.12", "3.13", "plistlib", {"_PlistWriter.write_value:_aware_datetime"}),
]


def stdlib(version: str) -> Path:
    found = subprocess.run([ROOT / ".ci" / "find-python", version], capture_output=True,
                           text=True)
    if found.returncode != 0:
        pytest.skip(f"needs Python {version}")
    path = subprocess.run(
        [found.stdout.strip(), "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    return Path(path)


@pytest.mark.parametrize(("old", "new", "module", "reads"), CASES,
                         ids=[f"{m}-{o}-{n}" for o, n, m, _ in CASES])
def test_a_read_of_an_attribute_only_the_new_init_sets_is_refused(old, new, module, reads):
    with pytest.raises(BuildRefused) as info:
        build_result(stdlib(old) / f"{module}.py", stdlib(new) / f"{module}.py", module=module)
    refused = {
        f"{r.what.partition(':')[2]}:{r.detail.split('reads self.')[1].split(',')[0]}"
        for r in info.value.refusals if r.reason is Reason.INSTANCE_STATE
    }
    assert reads <= refused, info.value.refusals
    for r in info.value.refusals:
        if r.reason is Reason.INSTANCE_STATE:
            assert "instances made before the patch have no" in r.detail
            assert "shadow variable" in r.hint.value
