"""The one reader of what the remote scripts print: `JLREMOTE-KEY value` lines, a
server's runtime JSON between `JLREMOTE-INFO` and `JLREMOTE-END`, and `JLREMOTE-ENTRY ID`
starting the record of one registry entry. Anything else (noise from the user's shell
start-up files) is ignored."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PREFIX = "JLREMOTE-"


@dataclass
class Record:
    """The lines of one record: every value of each key, in order, and the INFO block."""

    values: dict[str, list[str]] = field(default_factory=dict)
    info: list[str] | None = None

    def get(self, key: str, default: str = "") -> str:
        """The last value of KEY (DEFAULT when there is none)."""
        found = self.values.get(key)
        return found[-1] if found else default

    def all(self, key: str) -> list[str]:
        return self.values.get(key, [])

    def has(self, key: str) -> bool:
        return key in self.values

    def info_json(self) -> dict[str, Any] | None:
        """The INFO block as a JSON object; None when absent or incomplete."""
        if self.info is None:
            return None
        try:
            data = json.loads("\n".join(self.info))
        except ValueError:
            return None
        return data if isinstance(data, dict) else None


@dataclass
class Reply:
    """A script's whole output: what came before the first ENTRY, and each entry."""

    head: Record
    entries: list[Record]


def parse(stdout: str) -> Reply:
    head = Record()
    entries: list[Record] = []
    current = head
    in_info = False
    for line in stdout.splitlines():
        if in_info:
            if line == PREFIX + "END":
                in_info = False
            else:
                current.info.append(line)  # type: ignore[union-attr]
            continue
        if not line.startswith(PREFIX):
            continue
        key, _, value = line[len(PREFIX) :].partition(" ")
        if key == "INFO":
            in_info, current.info = True, []
            continue
        if key == "ENTRY":
            current = Record()
            entries.append(current)
        current.values.setdefault(key, []).append(value)
    return Reply(head, entries)
