"""`llip init DIR`: a starter experiments/ folder for a project of your own.

The copies inherit the shipped defaults by `base: llip:base.yaml`, so the new folder states only
what differs and picks up the installed llip-orch's defaults (every key is listed in
`llip:base.yaml`; `llip validate` checks the result)."""
from __future__ import annotations

import re
from pathlib import Path

from orchestrator.config.schema import PACKAGED, load_config, packaged_experiments
from orchestrator.errors import UserError

_BASE_LINE = re.compile(r"^base:\s*base\.yaml\s*$", re.MULTILINE)


def add_args(p) -> None:
    p.add_argument("dir", nargs="?", default=".", metavar="DIR", help="project folder (default: here)")
    p.add_argument("--force", action="store_true", help="overwrite files that already exist")


def init(dest: Path, force: bool = False) -> list[Path]:
    src = packaged_experiments()
    out = dest / "experiments"
    todo = [p for p in sorted(src.glob("*.yaml")) if p.name != "base.yaml"]
    clash = [out / p.name for p in todo if (out / p.name).exists()]
    if clash and not force:
        raise UserError(f"{clash[0]} already exists; pass --force to overwrite, or pick another DIR")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for p in todo:
        (out / p.name).write_text(_BASE_LINE.sub(f"base: {PACKAGED}base.yaml", p.read_text()))
        written.append(out / p.name)
    for w in written:  # what we wrote must load, or the user gets our mistake
        load_config(w)
    return written


def cli(args) -> int:
    dest = Path(args.dir)
    written = init(dest, args.force)
    print(f"wrote {len(written)} experiments to {dest / 'experiments'}: " + ", ".join(w.name for w in written))
    print(f"they inherit the installed defaults (base: {PACKAGED}base.yaml); next, in {dest}:")
    print("  llip shards emoji --out data/emoji    # real demo data from installed packages")
    print("  llip run experiments/demo.yaml")
    return 0
