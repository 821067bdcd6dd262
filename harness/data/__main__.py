"""``python -m harness.data {list, fetch, verify}``: the registered datasets on the command line.

    python -m harness.data list
    python -m harness.data fetch Set12 --root data/            # download + sha256 check
    python -m harness.data fetch BSD68 --root data/ --mirror http://lab-server/datasets
    python -m harness.data verify Set12 --root data/
"""

from __future__ import annotations

import argparse
import sys

from .fetch import DEFAULT_TIMEOUT_S, FetchError, fetch, verify
from .registry import DATASETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered datasets: colour, split, source")
    for command in ("fetch", "verify"):
        p = sub.add_parser(command, help=f"{command} a registered dataset under --root")
        p.add_argument("name", help=f"one of: {', '.join(DATASETS)}")
        p.add_argument("--root", required=True, help="data root (the set goes in its own folder under it)")
        if command == "fetch":
            p.add_argument("--mirror", help="base URL of a copy laid out like a data root (instead of the source)")
            p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per connection")
            p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for spec in DATASETS.values():
                how = f"{len(spec.manifest())} files, fetch" if spec.downloadable else "manual"
                print(f"{spec.name:10s} {spec.colour:5s} {spec.split:5s} {how:18s} {spec.source or '-'}")
        elif args.command == "fetch":
            report = fetch(args.name, args.root, mirror=args.mirror, timeout=args.timeout,
                           progress=not args.no_progress)
            print(f"{report.name}: {report.files} files verified under {report.root} "
                  f"({len(report.downloaded)} downloaded, {len(report.present)} already present)")
        else:
            result = verify(args.name, args.root)
            print(f"{args.name}: {len(result['ok'])} ok, {len(result['missing'])} missing, "
                  f"{len(result['mismatch'])} differ from the manifest")
            for key in ("missing", "mismatch"):
                for local in result[key][:10]:
                    print(f"  {key}: {local}")
            return 0 if not result["missing"] and not result["mismatch"] else 1
    except (FetchError, KeyError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
