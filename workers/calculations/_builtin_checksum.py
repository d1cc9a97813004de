"""Child process of the `checksum` calculation (standard library only, run by path).

Usage: _builtin_checksum.py INPUT OUTPUT_DIR [--no-byte-stats]. Writes OUTPUT_DIR/summary.json and
prints progress lines at most twice a second.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import time
from pathlib import Path

_CHUNK = 1 << 20
_PROGRESS_EVERY_S = 0.5


def _byte_stats(counts: collections.Counter[int], size: int) -> dict[str, object]:
    entropy = -sum(n / size * math.log2(n / size) for n in counts.values()) if size else 0.0
    printable = sum(n for byte, n in counts.items() if 32 <= byte < 127 or byte in (9, 10, 13))
    return {
        "distinct": len(counts),
        "most_common": [
            {"byte": byte, "char": chr(byte) if 32 <= byte < 127 else None, "count": n}
            for byte, n in counts.most_common(8)
        ],
        "entropy_bits_per_byte": round(entropy, 4),
        "printable_ascii_fraction": round(printable / size, 4) if size else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--no-byte-stats", dest="byte_stats", action="store_false")
    args = parser.parse_args()

    total = args.input.stat().st_size
    digest = hashlib.sha256()
    counts: collections.Counter[int] = collections.Counter()
    size = newlines = 0
    last_byte = b""
    next_report = time.monotonic()
    with args.input.open("rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            newlines += chunk.count(b"\n")
            if args.byte_stats:
                counts.update(chunk)
            size += len(chunk)
            last_byte = chunk[-1:]
            if time.monotonic() >= next_report:
                print(f"checksum: {size}/{total} bytes ({100 * size // max(total, 1)}%)")
                next_report = time.monotonic() + _PROGRESS_EVERY_S

    summary: dict[str, object] = {
        "calculation": "checksum",
        "size_bytes": size,
        "sha256": digest.hexdigest(),
        # A last line without a newline still counts (unlike `wc -l`).
        "lines": newlines + (1 if last_byte not in (b"", b"\n") else 0),
    }
    if args.byte_stats:
        summary["bytes"] = _byte_stats(counts, size)
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"checksum: done, {size} bytes, sha256 {summary['sha256']}")


if __name__ == "__main__":
    main()
