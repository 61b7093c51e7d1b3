"""Curation metadata: MetaCLIP's format (a JSON list of strings; an entry's id is its position).

`llip metadata build --out FILE.json` makes one from WordNet (Debian's `wordnet-base` files in
/usr/share/wordnet) plus optional extra word lists. MetaCLIP's released 500k list
(`metaclip/metaclip1/metadata.json` in facebookresearch/MetaCLIP) is in the same format and can be
named in `curation.metadata` as it is.
"""
from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path
from typing import Iterable, Optional

from orchestrator.errors import UserError

WORDNET_DIR = "/usr/share/wordnet"
POS = ("noun", "verb", "adj", "adv")
# MetaCLIP's own builder skips single punctuation characters; entries holding a character that
# matching spaces out (`,.;:?!` and backtick, tab, newline) could never match and are skipped too.
_UNMATCHABLE = set(",.;:?!`\t\n\r")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_metadata(path: str | Path, what: str = "curation.metadata") -> tuple[list[str], str]:
    """(entries, sha256 of the file); one-line UserError naming the file and the fix otherwise."""
    p = Path(path)
    fix = "a JSON list of strings (MetaCLIP's format); build one with `llip metadata build --out FILE.json`"
    if not p.is_file():
        raise UserError(f"{what}: {path} not found; give {fix}")
    try:
        entries = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{what}: {path} is not UTF-8 text; it must be {fix}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what}: {path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); "
                        f"it must be {fix}") from None
    if not isinstance(entries, list):
        raise UserError(f"{what}: {path} holds a JSON {type(entries).__name__}, not a list; it must be {fix}")
    if not entries:
        raise UserError(f"{what}: {path} is an empty list, so nothing could match; give {fix}")
    bad = next((i for i, e in enumerate(entries) if not isinstance(e, str)), None)
    if bad is not None:
        raise UserError(f"{what}: {path}: item {bad} is {json.dumps(entries[bad])[:40]} "
                        f"({type(entries[bad]).__name__}), not a string; it must be {fix}")
    return entries, file_sha256(p)


def wordnet_lemmas(root: str = WORDNET_DIR, pos: Iterable[str] = POS) -> list[str]:
    """Every lemma in WordNet's index.<pos> files, underscores as spaces, in file order."""
    out: list[str] = []
    for part in pos:
        f = Path(root) / f"index.{part}"
        if not f.is_file():
            raise UserError(f"{f}: not found; install Debian's wordnet-base (apt-get install wordnet-base) "
                            "or point --wordnet at a WordNet 3 dict folder")
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or not line.strip():  # the licence header is indented
                    continue
                out.append(line.split(" ", 1)[0].replace("_", " "))
    return out


def _word_list(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--words {path}: not found; give a text file with one entry per line or a JSON list")
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".json":
        entries, _ = load_metadata(p, what="--words")
        return entries
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_metadata(out: str, wordnet: Optional[str] = WORDNET_DIR, pos: Iterable[str] = POS,
                   words: Iterable[str] = (), numbers: bool = True) -> dict:
    """Write the metadata list; entries deduplicated (first occurrence wins), unmatchable ones
    skipped. Returns a summary dict."""
    sources: list[tuple[str, list[str]]] = []
    if numbers:  # MetaCLIP seeds its list with "0".."99"
        sources.append(("numbers", [str(i) for i in range(100)]))
    if wordnet:
        sources.append(("wordnet", wordnet_lemmas(wordnet, pos)))
    for w in words:
        sources.append((w, _word_list(w)))
    if not sources:
        raise UserError("llip metadata build: no source; drop --no-wordnet or give --words FILE")
    seen: set[str] = set()
    entries: list[str] = []
    per_source, skipped = {}, 0
    for name, items in sources:
        n0 = len(entries)
        for e in items:
            if not e.strip() or e in string.punctuation or any(c in _UNMATCHABLE for c in e):
                skipped += 1
                continue
            if e not in seen:
                seen.add(e)
                entries.append(e)
        per_source[name] = len(entries) - n0
    if not entries:
        raise UserError("llip metadata build: every entry was empty or unmatchable; check the word lists")
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(entries, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"entries": len(entries), "per_source": per_source, "skipped_unmatchable": skipped,
            "sha256": file_sha256(p), "out": str(p)}


# --------------------------------------------------------------------------------------------
# CLI: llip metadata build
# --------------------------------------------------------------------------------------------
def add_args(p) -> None:
    sub = p.add_subparsers(dest="metadata_command", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="write a MetaCLIP-format metadata list from WordNet and word lists",
                       description="Write a MetaCLIP-format metadata list (JSON list of strings) from WordNet "
                                   "lemmas and optional word lists. For MetaCLIP's released 500k list, download "
                                   "metaclip/metaclip1/metadata.json and name it in curation.metadata instead.")
    b.add_argument("--out", required=True, metavar="FILE.json")
    b.add_argument("--wordnet", default=WORDNET_DIR, metavar="DIR",
                   help=f"WordNet dict folder with index.<pos> files (default {WORDNET_DIR})")
    b.add_argument("--no-wordnet", action="store_true", help="only the --words lists")
    b.add_argument("--pos", default=",".join(POS), help="parts of speech to take from WordNet (default all)")
    b.add_argument("--words", action="append", default=[], metavar="FILE",
                   help="extra entries: a text file (one per line) or a JSON list (repeatable)")
    b.add_argument("--no-numbers", action="store_true", help="leave out MetaCLIP's entries 0..99")


def cli(args) -> int:
    pos = [x.strip() for x in args.pos.split(",") if x.strip()]
    bad = [x for x in pos if x not in POS]
    if bad:
        raise UserError(f"--pos {args.pos}: unknown part(s) of speech {bad}; use some of {','.join(POS)}")
    s = build_metadata(args.out, None if args.no_wordnet else args.wordnet, pos, args.words,
                       numbers=not args.no_numbers)
    parts = ", ".join(f"{k}: {v}" for k, v in s["per_source"].items())
    print(f"wrote {s['entries']} entries to {s['out']} ({parts}; skipped {s['skipped_unmatchable']} "
          f"unmatchable; sha256 {s['sha256'][:12]})")
    return 0
