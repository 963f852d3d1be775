"""The README's benchmark tables, made from step-benchmark CSVs.

    python -m bench.readme_table bench/results/step_cpu_<date>.csv [more.csv ...]
    python -m bench.readme_table <csv> --full              # every optimizer, layout and dtype
    python -m bench.readme_table <csv> --write README.md   # also rewrite the marked block

Prints markdown: the conditions of the run (device, versions, commit, copy bandwidth), then
  1. the headline: InexactPolyak on every layout and dtype, one column per provider, each cell
     "median ms (percent of the floor)";
  2. every optimizer on one layout (the GPT-2-shaped one, float32), same cells.
With --write, the text between the lines ``<!-- bench-table:start -->`` and
``<!-- bench-table:end -->`` of the given file is replaced; the file is left alone if it has no
such markers.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

PROVIDERS = ("reference", "foreach_item", "foreach", "compiled", "torch_sgd_clip", "fused")
LABELS = {"inexact_polyak": "InexactPolyak", "polyak": "Polyak", "decsps": "DecSPS",
          "adasps": "AdaSPS", "dog": "DoG", "clipped_sgd": "ClippedSGD", "nsgdm": "NSGDM"}
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def read_rows(paths) -> list[dict]:
    rows = []
    for p in paths:
        with open(p, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def _fmt_ms(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if not row.get("median_ms"):
        return "failed" if "failed" in row.get("note", "") else "n/a"
    frac = float(row["frac_of_floor"]) * 100
    return f"{_fmt_ms(float(row['median_ms']))} ({frac:.0f}%)"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def conditions(rows: list[dict]) -> str:
    """One line per distinct run (device, versions, commit, date, copy bandwidth)."""
    seen, lines = set(), []
    for r in rows:
        key = (r["device_name"], r["torch"], r["triton"], r["git_sha"], r["date"], r["copy_gbps"])
        if key in seen:
            continue
        seen.add(key)
        load = ""
        m = re.search(r"load avg ([0-9./]+) at start", r.get("note", ""))
        if m:
            load = f", load average {m.group(1)} (1/5/15 min) at start"
        threads = r.get("threads", "?")
        threads = f"{threads} thread" + ("" if threads == "1" else "s")
        lines.append(f"{r['device_name']}, {threads}{load}; torch "
                     f"{r['torch']}, triton {r['triton'] or 'n/a'}; commit {r['git_sha']}; "
                     f"{r['date']}; measured copy bandwidth {float(r['copy_gbps']):.1f} GB/s "
                     "(read + write)")
    return "\n".join(f"- {x}" for x in lines)


def _providers(rows) -> list[str]:
    present = {r["provider"] for r in rows}
    return [p for p in PROVIDERS if p in present]


def _table(rows, keys, key_cols, provs) -> list[str]:
    head = key_cols + ["params / tensors", "floor ms"] + provs
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        group = [r for r in rows if tuple(r[k] for k in key[0]) == key[1]]
        if not group:
            continue
        r0 = group[0]
        by_prov = {r["provider"]: r for r in group}
        cells = [LABELS.get(v, v) for v in key[1]]
        cells += [f"{_params(int(r0['n_params']))} / {r0['n_tensors']}",
                  _fmt_ms(float(r0["floor_ms"]))]
        cells += [_cell(by_prov.get(p)) for p in provs]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _ordered(values, order):
    return sorted(set(values), key=lambda v: (order.index(v) if v in order else len(order), v))


def make_tables(rows: list[dict], full: bool = False) -> str:
    if not rows:
        raise ValueError("no rows")
    provs = _providers(rows)
    opt_order = list(LABELS)
    layouts = _ordered([r["layout"] for r in rows], [])
    layouts = sorted(set(layouts), key=lambda n: min(int(r["n_params"]) for r in rows
                                                     if r["layout"] == n))
    dtypes = _ordered([r["dtype"] for r in rows], ["float32", "bfloat16", "float16"])
    parts = ["Conditions:", conditions(rows), "",
             "Cells: median time of one `step()` in ms (in brackets: the floor time as a percent "
             "of it, where floor = algorithmic bytes / measured copy bandwidth; 100% = at the "
             "floor). 'failed': see the CSV note.", ""]
    if full:
        keys = [(("optimizer", "layout", "dtype"), (m, lay, d))
                for m in _ordered([r["optimizer"] for r in rows], opt_order)
                for lay in layouts for d in dtypes]
        parts += _table(rows, keys, ["optimizer", "layout", "dtype"], provs)
        return "\n".join(parts) + "\n"
    headline = [r for r in rows if r["optimizer"] == "inexact_polyak"]
    if headline:
        parts.append("InexactPolyak, every layout:")
        parts.append("")
        keys = [(("layout", "dtype"), (lay, d)) for lay in layouts for d in dtypes]
        parts += _table(headline, keys, ["layout", "dtype"], _providers(headline))
        parts.append("")
    gpt = [lay for lay in layouts if lay.startswith("gpt2")]
    lay = gpt[0] if gpt else layouts[0]
    dt = "float32" if "float32" in dtypes else dtypes[0]
    sub = [r for r in rows if r["layout"] == lay and r["dtype"] == dt]
    if sub:
        parts.append(f"Every optimizer, layout {lay}, {dt}:")
        parts.append("")
        keys = [(("optimizer",), (m,)) for m in _ordered([r["optimizer"] for r in sub], opt_order)]
        parts += _table(sub, keys, ["optimizer"], _providers(sub))
    return "\n".join(parts) + "\n"


def write_block(path: Path, text: str) -> bool:
    """Replace the marked block of `path` with `text`; False if the markers are missing."""
    content = path.read_text()
    i, j = content.find(START), content.find(END)
    if i < 0 or j < 0 or j < i:
        return False
    path.write_text(content[: i + len(START)] + "\n" + text + content[j:])
    return True


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.readme_table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", type=Path)
    ap.add_argument("--full", action="store_true", help="one row per optimizer, layout and dtype")
    ap.add_argument("--write", type=Path, default=None,
                    help="also rewrite the bench-table block of this file (e.g. README.md)")
    a = ap.parse_args(argv)
    text = make_tables(read_rows(a.csv), full=a.full)
    print(text, end="")
    if a.write is not None:
        if write_block(a.write, text):
            print(f"<!-- rewrote the bench-table block of {a.write} -->", file=sys.stderr)
        else:
            print(f"{a.write} has no {START} ... {END} block: left unchanged", file=sys.stderr)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
