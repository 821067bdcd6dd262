"""The one table formatter: a DataFrame (or a list of dicts) as a Markdown or LaTeX table.

Used by the reports (``harness.report``, ``harness.report.study``), the ladder and presets scripts
(``harness/bench``) and anything else that prints a table, so every table formats numbers the same
way: missing values as "–", integers of 10,000 and more with thousands separators, floats with
the column's digits (scientific notation when they would round to zero).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd


def format_cell(value: Any, digits: int = 2) -> str:
    """One cell: "–" for None/NaN, ints with separators from 10,000, floats with ``digits`` decimals."""
    if value is None or (isinstance(value, (float, np.floating)) and not math.isfinite(float(value))):
        if isinstance(value, (float, np.floating)) and math.isinf(float(value)):
            return "inf" if value > 0 else "-inf"
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}" if abs(int(value)) >= 10000 else str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v == int(v) and (abs(v) >= 1e4 or digits == 0):
            return f"{int(v):,}" if abs(v) >= 1e4 else str(int(v))
        return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.2e}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _frame(table: pd.DataFrame | Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    return table if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table))


def _cells(table, columns, digits) -> tuple[list[str], list[list[str]]]:
    df = _frame(table)
    columns = [c for c in (columns or list(df.columns)) if c in df.columns]
    rows = []
    for _, row in df.iterrows():
        rows.append([format_cell(row[c], digits.get(c, 2) if isinstance(digits, Mapping) else digits)
                     for c in columns])
    return columns, rows


def markdown_table(table: pd.DataFrame | Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   digits: int | Mapping[str, int] = 2) -> str:
    """A GitHub Markdown table of ``table`` (``columns`` picks and orders; ``digits`` per column or for all)."""
    columns, rows = _cells(table, columns, digits)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def latex_table(table: pd.DataFrame | Sequence[Mapping[str, Any]], caption: str,
                columns: Sequence[str] | None = None, digits: int | Mapping[str, int] = 2) -> str:
    """The same table as a booktabs LaTeX ``table`` environment with ``caption``."""
    columns, rows = _cells(table, columns, digits)

    def esc(s: str) -> str:
        return (str(s).replace("\\|", "|").replace("_", r"\_").replace("%", r"\%").replace("Δ", r"$\Delta$")
                .replace("–", "--"))

    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{esc(caption)}}}",
             r"\begin{tabular}{" + "l" * len(columns) + "}", r"\toprule", " & ".join(esc(c) for c in columns) + r" \\",
             r"\midrule"]
    lines += [" & ".join(esc(c) for c in cells) + r" \\" for cells in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
