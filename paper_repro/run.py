"""Rerun the claims: `python paper_repro/run.py` (all of them) or `python paper_repro/run.py 06_takd`;
`--smoke` checks them end to end on tiny synthetic data in a minute.

Each claim folder's run.py has `main() -> dict` (its verdict and key numbers); this script
runs them in order, prints how long each took, and rewrites the index in README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
INDEX_START, INDEX_END = "<!-- index -->", "<!-- /index -->"


def claims() -> list[Path]:
    return sorted(p for p in ROOT.iterdir() if p.is_dir() and (p / "run.py").is_file())


def run_claim(folder: Path) -> dict:
    spec = importlib.util.spec_from_file_location(f"claim_{folder.name}", folder / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    spec.loader.exec_module(module)
    return module.main()


def write_index() -> None:
    rows = ["| # | claim | paper | command | held at this scale? |", "|---|---|---|---|---|"]
    for folder in claims():
        info = json.loads((folder / "claim.json").read_text()) if (folder / "claim.json").is_file() else {}
        rows.append(f"| [{folder.name}]({folder.name}/README.md) | {info.get('claim', '(not run yet)')} | "
                    f"{info.get('paper', '')} | `python paper_repro/run.py {folder.name}` | "
                    f"{info.get('verdict', 'not run yet')} |")
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(INDEX_START, 1)
    _, tail = rest.split(INDEX_END, 1)
    readme.write_text(f"{head}{INDEX_START}\n" + "\n".join(rows) + f"\n{INDEX_END}{tail}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Rerun the paper_repro claims (all, or the ones named).")
    parser.add_argument("claims", nargs="*", help="claim folders or their numbers, e.g. 06_takd or 06")
    parser.add_argument("--smoke", action="store_true",
                        help="check the claims' code end to end: tiny synthetic data, one epoch, one seed; "
                             "results go under --output, READMEs are left alone")
    parser.add_argument("--output", help="where runs go (default: runs/paper_repro)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import common

    common.SMOKE = args.smoke
    if args.output:
        common.OUTPUT_ROOT = Path(args.output)
    names = args.claims
    chosen = [f for f in claims() if not names or f.name in names or f.name.split("_", 1)[0] in names]
    if names and not chosen:
        print(f"no claim named {names}; claims: {', '.join(f.name for f in claims())}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    for folder in chosen:
        begin = time.perf_counter()
        print(f"== {folder.name}", flush=True)
        result = run_claim(folder)
        print(f"== {folder.name}: {result['verdict']} ({time.perf_counter() - begin:.0f}s)", flush=True)
    if not args.smoke:
        write_index()
    where = f"results under {common.OUTPUT_ROOT}" if args.smoke else "index in paper_repro/README.md"
    print(f"{len(chosen)} claim(s) in {(time.perf_counter() - started) / 60:.1f} min; {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
