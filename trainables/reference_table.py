"""A published table beside an ablation's page (``ancra-tune report STUDY --beside FILE``): the
paper's numbers, each row and column labelled with what the paper trained and attacked, next to the
cells of this study that measure the same way, with their n and interval; read side by side, never
tested against each other (another setting, one model a row, no n).

The reference file (YAML)::

    title: the paper's Table VIII
    setting: CIFAR-10, ResNet-18, 120 epochs on all 50,000 training images
    columns:                        # the paper's columns, each with what it measured
      Nat: clean accuracy
      PGD: PGD with P (the adaptive attack of its Table V)
    measured_here:                  # the page's column that measures as the paper's did: the first a row has
      Nat: [clean]
      PGD: [adaptive_p, pgd_final]
    rows:
      - name: TRADES
        when: {method.anc: false, model.ra: false}   # the study's configuration it stands beside
        values: {Nat: 78.92, PGD: 48.40}             # in %, as printed
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .ablation_table import COLUMNS, _cell, _conf

KNOWN = {c.key for c in COLUMNS}


class ReferenceError(ValueError):
    """A reference file that cannot stand beside a page; the message names the file and the key."""


def load(path: str | Path) -> dict[str, Any]:
    """Read and check a reference file (see the module)."""
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ReferenceError(f"cannot read the reference file {p}: {e}") from None

    def bad(key: str, why: str) -> ReferenceError:
        return ReferenceError(f"{p}: {key}: {why}")

    if not isinstance(raw, dict):
        raise bad("(top)", "a mapping with title, setting, columns and rows")
    for key in ("title", "setting"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise bad(key, "a sentence saying what the table is")
    columns = raw.get("columns")
    if not isinstance(columns, dict) or not columns or not all(isinstance(v, str) for v in columns.values()):
        raise bad("columns", "each of the table's columns with what it measured")
    here = raw.get("measured_here") or {}
    if not isinstance(here, dict):
        raise bad("measured_here", "a paper column -> a list of this page's columns")
    for name, picks in here.items():
        if name not in columns:
            raise bad(f"measured_here.{name}", f"not one of the columns ({', '.join(columns)})")
        if not isinstance(picks, list) or not picks or any(k not in KNOWN for k in picks):
            raise bad(f"measured_here.{name}", f"a list of this page's columns: {', '.join(sorted(KNOWN))}")
    rows = raw.get("rows")
    if not isinstance(rows, list) or not rows:
        raise bad("rows", "the table's rows, each with name, when and values")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise bad(f"rows[{i}]", "a name, the configuration it stands beside (when) and its values")
        if not isinstance(row.get("when"), dict) or not row["when"]:
            raise bad(f"rows[{i}].when", "the study's configuration this row stands beside, e.g. {model.ra: true}")
        values = row.get("values")
        if not isinstance(values, dict) or set(values) - set(columns):
            raise bad(f"rows[{i}].values", f"numbers for the columns {', '.join(columns)}")
        if not all(isinstance(v, (int, float)) for v in values.values()):
            raise bad(f"rows[{i}].values", "numbers, in % as printed")
    return {"title": raw["title"].strip(), "setting": raw["setting"].strip(), "columns": dict(columns),
            "measured_here": {k: list(v) for k, v in here.items()}, "rows": rows,
            "source": str(raw.get("source", "")).strip(), "file": str(p)}


def _matches(when: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    return all(k in config and config[k] == v for k, v in when.items())


def _n(cell: Mapping[str, Any] | None) -> str:
    return f" (n={cell['n']:,} x {cell['seeds']})" if cell else ""


def markdown(table: Mapping[str, Any], ref: Mapping[str, Any]) -> list[str]:
    """The section that sets ``ref`` beside the page's ``table`` (``ablation_table.build``)."""
    cols = list(ref["columns"])
    here = ref["measured_here"]
    titles = table.get("columns", {})
    lines = [f"## Beside: {ref['title']}", "",
             f"{ref['setting']}. Its numbers come from another setting and are not tested against this study's: "
             "they stand beside the cells of this study that measure as it did, for reading. It gives one "
             "model a row and no n or interval; this study's cells are in % with their 95% interval and "
             "n examples x seeds.", "",
             "| configuration | its row | " + " | ".join(f"{c} (%)" for c in cols) + " | "
             + " | ".join(f"here, as its {c}" for c in here) + " | here, worst case |",
             "|" + "---|" * (2 + len(cols) + len(here) + 1)]
    used = set()
    for row in table["rows"]:
        mine = [r for r in ref["rows"] if _matches(r["when"], row["config"])]
        used.update(id(r) for r in mine)
        ref_row = mine[0] if mine else None
        values = [f"{ref_row['values'][c]:.2f}" if ref_row and c in ref_row["values"] else "–" for c in cols]
        measured = []
        for picks in here.values():
            key = next((k for k in picks if row.get(k)), None)
            measured.append(f"{_cell(row[key])}{_n(row[key])}, {titles.get(key, {}).get('title', key)}" if key
                            else "–")
        worst = row.get("worst")
        lines.append(f"| {_conf(row['config'])} | {ref_row['name'] if ref_row else '–'} | " + " | ".join(values)
                     + " | " + " | ".join(measured) + f" | {_cell(worst)}{_n(worst)} |")
    lines += [""] + [f"- **{c}** (its column): {what}" for c, what in ref["columns"].items()]
    missing = [r["name"] for r in ref["rows"] if id(r) not in used]
    if missing:
        lines += ["", f"Its rows {', '.join(missing)} stand beside no configuration of this study."]
    if ref.get("source"):
        lines += ["", f"Source: {ref['source']}"]
    lines += ["", f"(`{Path(ref['file']).name}`, given to `ancra-tune report --beside`.)"]
    return lines
