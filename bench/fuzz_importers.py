"""Fuzz the dataset importers for longer than the test does (no atheris needed).

Runs N random cases from tests/core/data/importer_cases.py (well-formed files of every format, then
damaged: cut, flipped bytes, junk lines, latin-1/UTF-16 with or without BOM, empty, one huge line,
random bytes) and counts the outcomes. Every case must import or raise a MedtuneError with a
stable code; anything else is printed with the seed that reproduces it, and the exit code is 1.

    python bench/fuzz_importers.py [--cases 5000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0, help="first case's seed; case i uses seed+i")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="medtune-fuzz-"))
    # Dataset paths must lie in allowed folders: allow this run's own.
    os.environ["MEDTUNE_DATA_ROOTS"] = json.dumps([str(base)])
    from core.settings import get_settings
    from tests.core.data.importer_cases import check_case, make_case

    get_settings.cache_clear()
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    failures = 0
    started = time.perf_counter()
    for i in range(args.cases):
        seed = args.seed + i
        folder = Path(tempfile.mkdtemp(dir=base))
        label = "?"
        try:
            section, label = make_case(random.Random(seed), folder)
            outcomes[check_case(section)] += 1
            kinds[label.split("/")[0].split("+")[0]] += 1
        except Exception:
            failures += 1
            outcomes["FAILED"] += 1
            print(f"seed {seed} ({label}):\n{traceback.format_exc()}", file=sys.stderr)
    elapsed = time.perf_counter() - started
    print(
        json.dumps(
            {
                "cases": args.cases,
                "seconds": round(elapsed, 1),
                "outcomes": dict(outcomes.most_common()),
                "kinds": dict(kinds.most_common()),
                "failures": failures,
            }
        )
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
