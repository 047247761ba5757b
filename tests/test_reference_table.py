"""``ancra-tune report --beside FILE``: a published table set beside an ablation's rows, each of its
rows by the configuration it names, each of its columns beside the page's cell that measures the
same way (the first the row has), with n and interval; a malformed file is refused by key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trainables import reference_table as rt

ROOT = Path(__file__).resolve().parents[1]


def _cell(mean: float, n: int = 1667, seeds: int = 3) -> dict:
    return {"mean": mean, "ci95": [mean - 0.01, mean + 0.01], "n": n, "seeds": seeds, "flagged": 0}


def _table() -> dict:
    rows = []
    for anc in (False, True):
        for ra in (False, True):
            row = {"config": {"method.anc": anc, "model.ra": ra}, "clean": _cell(0.97 + 0.005 * anc),
                   "pgd_final": _cell(0.90, n=200), "worst": _cell(0.80 - 0.5 * ra)}
            if ra:
                row["adaptive_p"] = _cell(0.30, n=200)
            rows.append(row)
    rows.append({"config": {"method.anc": True, "model.ra": True, "optim.lr": 0.1}, "clean": None, "worst": None})
    return {"rows": rows, "columns": {"clean": {"title": "clean"}, "pgd_final": {"title": "PGD-40 on P'"},
                                      "adaptive_p": {"title": "adaptive on P (P+P')"}}}


def test_the_papers_rows_stand_beside_the_configurations_they_name() -> None:
    ref = rt.load(ROOT / "docs" / "paper" / "table8.yaml")
    lines = rt.markdown(_table(), ref)
    text = "\n".join(lines)
    assert lines[0] == "## Beside: the paper's Table VIII (TRADES, TRADES-ANC, TRADES-RA, TRADES-ANCRA)"
    assert "not tested against this study's" in text and "n examples x seeds" in text
    rows = [line for line in lines if line.startswith("| method.")]
    assert len(rows) == 5
    # TRADES: its numbers as printed; here PGD-40 on P' (no RA: P' is the only output), n shown.
    assert rows[0].startswith("| method.anc=False, model.ra=False | TRADES | 78.92 | 48.40 | 59.60 | 47.59 | "
                              "97.0 [96.0, 98.0] (n=1,667 x 3), clean | 90.0 [89.0, 91.0] (n=200 x 3), PGD-40 on P' "
                              "| 80.0 [79.0, 81.0] (n=1,667 x 3) |")
    # TRADES-RA: as the paper attacked it, with P (the adaptive attack), not PGD on P'.
    assert rows[1].startswith("| method.anc=False, model.ra=True | TRADES-RA | 80.46 | 61.59 |")
    assert "30.0 [29.0, 31.0] (n=200 x 3), adaptive on P (P+P')" in rows[1] and "PGD-40" not in rows[1]
    assert rows[2].split(" | ")[1] == "TRADES-ANC" and rows[3].split(" | ")[1] == "TRADES-ANCRA"
    # A configuration with no finished seed: its cells are dashes, the paper's row still stands.
    assert rows[4].endswith("| – | – |")
    assert "- **PGD** (its column): PGD with P" in text


def test_rows_of_the_paper_no_configuration_names_are_said(tmp_path: Path) -> None:
    f = tmp_path / "ref.yaml"
    f.write_text("title: T\nsetting: S\ncolumns: {Nat: clean}\nmeasured_here: {Nat: [clean]}\nrows:\n"
                 "  - {name: A, when: {method.anc: false, model.ra: false}, values: {Nat: 1}}\n"
                 "  - {name: MART, when: {method.base_loss: mart}, values: {Nat: 2}}\n")
    text = "\n".join(rt.markdown(_table(), rt.load(f)))
    assert "Its rows MART stand beside no configuration of this study." in text


@pytest.mark.parametrize(("body", "key"), [
    ("setting: S\ncolumns: {Nat: x}\nrows: [{name: A, when: {a: 1}, values: {Nat: 1}}]", "title"),
    ("title: T\nsetting: S\nrows: [{name: A, when: {a: 1}, values: {Nat: 1}}]", "columns"),
    ("title: T\nsetting: S\ncolumns: {Nat: x}\nrows: [{name: A, when: {a: 1}, values: {PGD: 1}}]", "rows[0].values"),
    ("title: T\nsetting: S\ncolumns: {Nat: x}\nrows: [{name: A, values: {Nat: 1}}]", "rows[0].when"),
    ("title: T\nsetting: S\ncolumns: {Nat: x}\nrows: [{name: A, when: {a: 1}, values: {Nat: high}}]",
     "rows[0].values"),
    ("title: T\nsetting: S\ncolumns: {Nat: x}\nmeasured_here: {Nat: [fgsm]}\n"
     "rows: [{name: A, when: {a: 1}, values: {Nat: 1}}]", "measured_here.Nat"),
    ("title: T\nsetting: S\ncolumns: {Nat: x}\nmeasured_here: {PGD: [clean]}\n"
     "rows: [{name: A, when: {a: 1}, values: {Nat: 1}}]", "measured_here.PGD"),
])
def test_a_malformed_reference_is_refused_by_its_key(tmp_path: Path, body: str, key: str) -> None:
    f = tmp_path / "ref.yaml"
    f.write_text(body)
    with pytest.raises(rt.ReferenceError, match=re.escape(f"ref.yaml: {key}:")):
        rt.load(f)
