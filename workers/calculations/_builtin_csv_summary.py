"""Child process of the `csv-summary` calculation (standard library only, run by path).

Usage: _builtin_csv_summary.py INPUT OUTPUT_DIR [--delimiter C] [--no-header]. Streams the file
once in bounded memory and writes OUTPUT_DIR/summary.json: the row count and, per column, filled and
empty counts, numeric statistics (when every filled value is a finite number), distinct values and
the most common ones.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import time
from pathlib import Path

_PROGRESS_EVERY_S = 0.5
_MAX_DISTINCT = 1000  # per column; beyond it distinct and top counts are lower bounds
_MAX_VALUE_CHARS = 100  # values are tracked by this prefix, to bound memory


class _Column:
    def __init__(self, name: str) -> None:
        self.name = name
        self.filled = 0
        self.empty = 0
        self.numbers = 0
        self.mean = 0.0
        self.squares = 0.0  # Welford's running sum of squared deviations
        self.low = math.inf
        self.high = -math.inf
        self.values: collections.Counter[str] = collections.Counter()
        self.capped = False

    def add(self, value: str) -> None:
        if not value.strip():
            self.empty += 1
            return
        self.filled += 1
        key = value[:_MAX_VALUE_CHARS]
        if key in self.values or len(self.values) < _MAX_DISTINCT:
            self.values[key] += 1
        else:
            self.capped = True
        try:
            number = float(value)
        except ValueError:
            return
        if not math.isfinite(number):
            return
        self.numbers += 1
        delta = number - self.mean
        self.mean += delta / self.numbers
        self.squares += delta * (number - self.mean)
        self.low, self.high = min(self.low, number), max(self.high, number)

    def summary(self) -> dict[str, object]:
        numeric = self.filled > 0 and self.numbers == self.filled
        result: dict[str, object] = {
            "name": self.name,
            "type": "empty" if not self.filled else "numeric" if numeric else "text",
            "filled": self.filled,
            "empty": self.empty,
            "distinct": len(self.values),
            "distinct_capped": self.capped,
            "top": [{"value": v, "count": n} for v, n in self.values.most_common(5)],
        }
        if numeric:
            result["numeric"] = {
                "min": self.low,
                "max": self.high,
                "mean": self.mean,
                "stdev": math.sqrt(self.squares / (self.numbers - 1)) if self.numbers > 1 else None,
            }
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--delimiter", default=",")
    parser.add_argument("--no-header", dest="header", action="store_false")
    args = parser.parse_args()

    columns: list[_Column] = []
    rows = ragged = 0
    next_report = time.monotonic() + _PROGRESS_EVERY_S
    with args.input.open(newline="", encoding="utf-8", errors="replace") as source:
        reader = csv.reader(source, delimiter=args.delimiter)
        if args.header:
            columns = [_Column(name) for name in next(reader, [])]
        width = len(columns)
        for row in reader:
            rows += 1
            if args.header and len(row) != width:
                ragged += 1
            while len(columns) < len(row):  # extra fields get positional names
                column = _Column(f"column_{len(columns) + 1}")
                column.empty = rows - 1  # the earlier, shorter rows had nothing here
                columns.append(column)
            for index, column in enumerate(columns):
                column.add(row[index] if index < len(row) else "")
            if time.monotonic() >= next_report:
                print(f"csv-summary: {rows} rows")
                next_report = time.monotonic() + _PROGRESS_EVERY_S

    summary = {
        "calculation": "csv-summary",
        "rows": rows,
        "ragged_rows": ragged,
        "columns": [column.summary() for column in columns],
    }
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"csv-summary: done, {rows} rows, {len(columns)} columns")


if __name__ == "__main__":
    main()
