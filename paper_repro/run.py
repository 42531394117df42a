"""Rerun the claims: `python paper_repro/run.py` (all of them) or `python paper_repro/run.py 06_takd`.

Each claim folder's run.py has `main() -> dict` (its verdict and key numbers); this script
runs them in order, prints how long each took, and rewrites the index in README.md.
"""

from __future__ import annotations

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


def main(names: list[str]) -> int:
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
    write_index()
    print(f"{len(chosen)} claim(s) in {(time.perf_counter() - started) / 60:.1f} min; index in paper_repro/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
