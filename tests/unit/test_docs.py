"""The documentation stays true to the code: every error message jlremote can print is
listed in the troubleshooting page, every exit code in the README and that page."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from jlremote.errors import ExitCode

ROOT = Path(__file__).resolve().parents[2]
TROUBLESHOOTING = (ROOT / "docs" / "pages" / "troubleshooting.md").read_text()
README = (ROOT / "README.md").read_text()


def error_messages() -> list[tuple[str, str]]:
    """(where, the message's fixed words) for every JlremoteError("...") in the package.
    For f-strings, the longest literal run stands for the message."""
    found = []
    for path in sorted((ROOT / "jlremote").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name != "JlremoteError":
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                runs = [first.value]
            elif isinstance(first, ast.JoinedStr):
                runs = [v.value for v in first.values if isinstance(v, ast.Constant)]
            else:
                continue  # a message passed on from elsewhere (its source is checked there)
            words = max((r.strip(" :;,.()'") for r in runs), key=len)
            if len(words) >= 8:
                found.append((f"{path.name}:{node.lineno}", words))
    return found


def script_messages() -> list[tuple[str, str]]:
    """(where, fixed words) for every message of the remote scripts: `say MSG`,
    `fail CODE MSG`, `job_fail CODE MSG` (the words before the first variable)."""
    found = []
    call = re.compile(r"""(?:\bsay|\bfail "\$[A-Z_]+"|job_fail "\$[A-Z_]+")\s+(['"])(.+?)\1""")
    for path in sorted((ROOT / "jlremote" / "sh").glob("*.sh")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for m in call.finditer(line):
                words = max(re.split(r"\$\{?\w+\}?", m.group(2)), key=len).strip(" :;,.()'")
                if len(words) >= 8:
                    found.append((f"{path.name}:{number}", words))
    return found


def test_every_error_message_is_in_troubleshooting() -> None:
    scripted = script_messages()
    assert len(scripted) > 15
    messages = error_messages() + scripted
    assert len(messages) > 40
    missing = [(where, words) for where, words in messages if words not in TROUBLESHOOTING]
    assert not missing, "add these to docs/pages/troubleshooting.md: " + repr(missing)


def test_every_exit_code_is_documented() -> None:
    for code in ExitCode:
        row = re.compile(rf"^\| {int(code)} \|", re.M)
        assert row.search(README), f"README lacks exit code {int(code)}"
        assert row.search(TROUBLESHOOTING), f"troubleshooting lacks exit code {int(code)}"
