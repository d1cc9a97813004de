"""Child process of the `sleep` calculation, for tests and demos (standard library only).

Usage: _builtin_sleep.py SECONDS OUTPUT_DIR [--exit-code N]. Prints a progress line at the start and
after every second, writes OUTPUT_DIR/summary.json, then exits with N.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("seconds", type=float)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--exit-code", type=int, default=0)
    args = parser.parse_args()

    started = time.monotonic()
    print(f"sleep: 0/{args.seconds:g} s")
    while (elapsed := time.monotonic() - started) < args.seconds:
        time.sleep(min(1.0, args.seconds - elapsed))
        print(f"sleep: {min(time.monotonic() - started, args.seconds):.1f}/{args.seconds:g} s")
    summary = {"calculation": "sleep", "seconds": args.seconds, "exit_code": args.exit_code}
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    sys.exit(args.exit_code)


if __name__ == "__main__":
    main()
