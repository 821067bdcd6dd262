"""Re-render a report from the store without re-running: python -m harness.report EXPERIMENT."""

import argparse
import os

from harness.report import write_report

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("experiment")
parser.add_argument("--store", default=os.environ.get("EABENCH_STORE", "results/store"),
                    help="store directory (default: $EABENCH_STORE, else results/store, as run.py)")
parser.add_argument("--out", default=None, help="output folder (default: reports/<experiment>)")
parser.add_argument("--reference", default=None, help="run name used as the reference for paired statistics")
args = parser.parse_args()
print(write_report(args.store, args.experiment, args.out or f"reports/{args.experiment}", args.reference))
