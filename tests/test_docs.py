"""The README's test command is the one CI runs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    test_cmd = [c for c in commands if "pytest" in c]
    assert len(test_cmd) == 1, commands
    assert test_cmd[0] in ci.splitlines()
    assert any("benchmarks/bench.py" in c for c in commands)
