"""README code blocks that tests run. A block is named by the HTML comment on the line before it
(``<!-- snippet: NAME -->``, invisible on GitHub), so a test runs exactly what the README shows."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str) -> str:
    """The python block that follows ``<!-- snippet: NAME -->`` in README.md."""
    match = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```python\n(.*?)```",
                      README.read_text(), re.S)
    assert match, f"README.md has no ```python block after <!-- snippet: {name} -->"
    return match.group(1)


def run_snippet(name: str, workdir: Path, monkeypatch) -> dict:
    """Run a README block as a script in ``workdir`` (where it writes its outputs); returns its
    global namespace for the test to inspect."""
    monkeypatch.chdir(workdir)
    namespace = {"__name__": f"readme_snippet_{name.replace('-', '_')}"}
    exec(compile(snippet(name), f"README.md <!-- snippet: {name} -->", "exec"), namespace)
    return namespace
