"""README's Python snippets run as written (in order, in one namespace, like a session)."""

import os
import re
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
sys.path.insert(0, REPO)  # The snippets run from the repository root, where `configs` is.


def _snippets():
    text = open(README).read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_snippets_run(monkeypatch, tmp_path):
    # The snippets' temporary directories (a training run's workdir) go where pytest
    # cleans up, not in the system's temporary directory, one more each run.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    snippets = _snippets()
    assert len(snippets) >= 4
    namespace = {"__name__": "readme"}
    for i, code in enumerate(snippets):
        try:
            exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001  Say which snippet broke.
            raise AssertionError(f"README snippet {i + 1} fails: {e!r}\n{code}") from e
