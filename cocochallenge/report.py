"""The notebooks as the team's report: the team block filled in, its readings tied to the outputs.

What depends on a run's numbers is printed by code under each output (:mod:`readings`); the
team's own interpretation sits in the markdown cells tagged ``team-reading``. Those cells are
the prose that can fall out of step with the outputs (written for an earlier run), so they are
checked: every decimal number they quote must stand in the outputs. The hand-in
(:mod:`handin`) warns when a check fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

#: The placeholders of challenge.ipynb's team block (the cell tagged ``team``).
TEAM_PLACEHOLDERS = ("(your names)", "(who did what)")
#: The tag of the markdown cells that hold the team's own reading of the outputs.
READING_TAG = "team-reading"

_NUMBER = r"(?<![\w.])\d+\.\d+(?![\d])"
_REFERENCE = r"\(§(\d+)\)"


def unbacked_numbers(notebook: dict) -> list[str]:
    """Numbers the team's readings quote that the outputs do not hold ([] when none).

    The readings: the markdown cells tagged ``team-reading`` (:data:`READING_TAG`). Each decimal
    number must appear in the outputs of the code cells of the section the prose refers to:
    the section named by the next ``(§N)`` in the same paragraph, else the prose's own section
    (``## N.`` headings). Quoted lines (``>``) hold figures from elsewhere and are not checked.
    A failure means the prose was written for another run.
    """
    sections, current = {}, 0
    for cell in notebook["cells"]:
        text = "".join(cell["source"])
        heading = re.match(r"## (\d+)\. ", text)
        if cell["cell_type"] == "markdown" and heading:
            current = int(heading.group(1))
        cell["_section"] = current
        if cell["cell_type"] == "code":
            sections.setdefault(current, []).append(json.dumps(cell.get("outputs", [])))
    problems = []
    for cell in notebook["cells"]:
        text = "".join(cell["source"])
        if cell["cell_type"] != "markdown" or not is_reading(cell):
            continue
        for paragraph in re.split(r"\n\s*\n", text):
            lines = [line for line in paragraph.splitlines() if not line.lstrip().startswith(">")]
            rest, start = " ".join(lines), 0
            for ref in list(re.finditer(_REFERENCE, rest)) + [None]:
                end = ref.start() if ref else len(rest)
                section = int(ref.group(1)) if ref else cell["_section"]
                shown = "\n".join(sections.get(section, []))
                for number in re.findall(_NUMBER, rest[start:end]):
                    if not re.search(rf"(?<![\d.]){re.escape(number)}(?!\d)", shown):
                        problems.append(f"{number} (section {section}): not in its outputs")
                start = end
    for cell in notebook["cells"]:
        cell.pop("_section", None)
    return problems


def is_reading(cell: dict) -> bool:
    """Whether a cell is one of the team's readings (tagged :data:`READING_TAG`)."""
    return READING_TAG in cell.get("metadata", {}).get("tags", [])


def team_blank(notebook: dict) -> bool:
    """Whether the team block (the markdown cell tagged ``team``) still holds its placeholders."""
    for cell in notebook["cells"]:
        if "team" in cell.get("metadata", {}).get("tags", []):
            return any(p in "".join(cell["source"]) for p in TEAM_PLACEHOLDERS)
    return False


def warnings_for(notebooks: dict) -> list[str]:
    """What a reader of these notebooks (``{path: notebook read}``) would object to: a blank
    team block, prose quoting numbers the outputs do not hold. Each a sentence naming it."""
    out = []
    for path, nb in notebooks.items():
        if team_blank(nb):
            out.append(f"{Path(path).name}: the team block is blank: write your names and who "
                       "did what in its 'Team' cell")  # fmt: skip
        bad = unbacked_numbers(nb)
        if bad:
            out.append(f"{Path(path).name}: its prose quotes numbers its outputs do not show "
                       f"(written for another run?): {'; '.join(bad[:5])}")  # fmt: skip
    return out
