"""The README's two set-up commands are exactly what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [c.strip() for c in re.findall(r"```bash\n(.*?)```", setup, re.S)]


def test_readme_has_exactly_one_install_and_one_test_command():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds)
    assert "pip install" in cmds[0] and "pytest" in cmds[1]


def test_ci_runs_the_readme_commands():
    lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    install, test = _readme_commands()
    assert install in lines, f"CI does not run the README install command {install!r}"
    assert test in lines, f"CI does not run the README test command {test!r}"
    assert lines.index(install) < lines.index(test)
