#!/usr/bin/env python3
"""Per seed: the service's test-set accuracy (``spacenet demo`` summaries) against the offline
runner's (``spacenet bench`` results.json) for one strategy.

    scripts/compare_e2e.py results/demo_e2e/runner/results.json results/demo_e2e/seed* \\
        --out results/demo_e2e/comparison.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runner", type=Path, help="the runner's results.json")
    p.add_argument("demos", type=Path, nargs="+", help="demo output folders (with summary.json)")
    p.add_argument("--strategy", default="spacenet")
    p.add_argument("--out", type=Path, help="write the comparison as JSON here")
    args = p.parse_args(argv)
    entry = json.loads(args.runner.read_text())["strategies"][args.strategy]
    runner = dict(zip(entry["seeds"], entry["per_seed_final_accuracy"], strict=True))
    rows = []
    for folder in args.demos:
        summary = json.loads((folder / "summary.json").read_text())
        seed = int(summary["seed"])
        service = summary["test"]["final_accuracy"]
        rows.append(
            {"seed": seed, "service": service, "runner": runner[seed], "difference": service - runner[seed]}
        )
    rows.sort(key=lambda r: r["seed"])
    print("seed  service   runner    difference")
    for r in rows:
        print(f"{r['seed']:>4}  {r['service']:.6f}  {r['runner']:.6f}  {r['difference']:+.6f}")
    worst = max(abs(r["difference"]) for r in rows)
    print(f"largest difference: {worst:.6f} ({worst * 100:.4f} points)")
    if args.out:
        args.out.write_text(
            json.dumps({"strategy": args.strategy, "seeds": rows, "max_abs_difference": worst}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
