"""The docs' tables: the step benchmark's (docs/benchmarks.md), and the main job's results
(bench.experiments, in README.md).

    python -m bench.readme_table bench/results/step_cpu_<date>.csv [more.csv ...]
    python -m bench.readme_table <csv> --full              # every optimizer, layout and dtype
    python -m bench.readme_table <csv> --write docs/benchmarks.md   # also rewrite the marked block

    python -m bench.readme_table --experiments                    # print the results blocks
    python -m bench.readme_table --experiments --write README.md  # rewrite them in the README
    python -m bench.readme_table --experiments --check README.md  # exit 1 if they are stale

The results blocks are made from the committed run, bench/results/experiments/ (--folder for
another): ``<!-- results:gpt -->`` ... ``<!-- /results:gpt -->`` holds the char-GPT table (and
its conditions, grid and comparison with AdamW), ``<!-- results:synthetic -->`` ...
``<!-- /results:synthetic -->`` the two Figure 1 tables, and ``<!-- results:foreach -->`` ...
``<!-- /results:foreach -->`` the foreach path's CPU table, from the newest committed
bench/results/foreach_cpu_<date>.csv (`python -m bench.foreach_benchmark`). `update_readme` replaces the text
between each pair of markers.

Step-benchmark tables:

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
import math
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


# ---- the main job's results (bench.experiments) --------------------------------------------------
#: The committed run of `python -m bench.experiments` (relative to the repository root).
RESULTS = Path(__file__).resolve().parent / "results" / "experiments"
BLOCKS = ("gpt", "synthetic", "foreach")


def markers(name: str) -> tuple[str, str]:
    return f"<!-- results:{name} -->", f"<!-- /results:{name} -->"


def _csv(folder: Path, name: str) -> list[dict]:
    with open(Path(folder) / name, newline="") as fh:
        return list(csv.DictReader(fh))


def run_info(folder: Path = RESULTS) -> dict:
    return {r["key"]: r["value"] for r in _csv(folder, "run_info.csv")}


def _minutes(seconds: str) -> str:
    s = float(seconds)
    return f"{s:.0f} s" if s < 90 else f"{int(s // 60)} min {s % 60:.0f} s"


def conditions_line(info: dict, prefix: str) -> str:
    """Where the numbers of one experiment come from: command, commit, machine, threads, load,
    time."""
    parts = [f"`{info[prefix + 'command']}` at commit {info[prefix + 'git']}, "
             f"{info[prefix + 'date']}"]
    if "machine" in info:
        parts.append(info["machine"])
    if prefix + "threads" in info:
        parts.append(f"torch threads {info[prefix + 'threads']}")
    parts.append(f"Python {info[prefix + 'python']}, torch {info[prefix + 'torch']}")
    if "load_at_start" in info:
        parts.append(f"load average (1/5/15 min) {info['load_at_start']} at start, "
                     f"{info.get('load_at_end', '?')} at end")
    seconds = info.get(prefix + "seconds")
    wall = info.get("wall_seconds")
    what = {"gpt_": "the char-GPT", "synthetic_": "the synthetic experiment"}[prefix]
    timing = f"{what} took {_minutes(seconds)}" if seconds else ""
    if wall:
        timing += f" (the whole job {_minutes(wall)})"
    if timing:
        parts.append(timing)
    return "Conditions: " + "; ".join(parts) + "."


def _f3(v: str) -> str:
    return f"{float(v):.3f}"


def gpt_block(folder: Path = RESULTS) -> str:
    """The char-GPT results (markdown) from gpt_summary.csv, gpt_grid.csv and run_info.csv."""
    from . import char_gpt as G
    info = run_info(folder)
    summary = _csv(folder, "gpt_summary.csv")
    grid = _csv(folder, "gpt_grid.csv")
    counts = {m: sum(1 for r in grid if r["method"] == m) for m in G.TUNED}
    counts["clipped_sgd"] += counts["sgd"]  # its grid includes clip = inf, the SGD runs
    ok = [r for r in summary if r["diverged"] == "0"]
    best = min((float(r["test_loss"]) for r in ok), default=math.nan)
    adamw = next((float(r["test_loss"]) for r in summary if r["method"] == "adamw"), None)
    head = ["method", "selected", "train", "val", "test"] + (["test − AdamW"] if adamw else [])
    lines = [conditions_line(info, "gpt_"), "",
             f"Model and data: {info['gpt_config']}; {int(info['gpt_parameters']):,} parameters; "
             f"corpus: {info['gpt_corpus']}; grids: SGD / clipped SGD lr {{{info['gpt_lr_grid']}}}"
             f" × clip {{{info['gpt_clip_grid']}}}"
             + (f", AdamW lr {{{info['gpt_adamw_lr_grid']}}}" if "gpt_adamw_lr_grid" in info
                else "") + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        m = r["method"]
        label = G.LABELS[m]
        if m in counts:
            label = label.replace("(tuned)", f"(tuned, {counts[m]} runs)")
        hp = r["hyperparameters"].replace("=", " = ").replace("inf", "∞")
        test = _f3(r["test_loss"])
        if r["diverged"] != "0":
            test += " (diverged)"
        elif float(r["test_loss"]) == best:
            test = f"**{test}**"
        cells = [label, "–" if hp == "-" else hp, _f3(r["final_train_loss"]),
                 _f3(r["final_val_loss"]), test]
        if adamw:
            cells.append(f"{float(r['test_loss']) - adamw:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    tuned = []
    for m in G.TUNED:
        points = [r for r in grid if r["method"] == m]
        if not points:
            continue
        text = ", ".join(
            (f"lr {float(r['lr']):g}" + (f" clip {float(r['clip']):g}" if r["clip"] else "")
             + ": " + ("diverged" if r["diverged"] != "0" else _f3(r["test_loss"])))
            for r in points)
        tuned.append(f"{G.LABELS[m].replace(' (tuned)', '')} {text}")
    if tuned:
        lines += ["", "The grid (`gpt_grid.csv`), test loss: " + "; ".join(tuned) + "."]
    return "\n".join(lines) + "\n"


def synthetic_block(folder: Path = RESULTS) -> str:
    """The Figure 1 tables (markdown) from synthetic_summary.csv and synthetic_inexact_polyak.csv."""
    from . import synthetic as S
    info = run_info(folder)
    summary = _csv(folder, "synthetic_summary.csv")
    sweep = _csv(folder, "synthetic_inexact_polyak.csv")
    l1s = list(dict.fromkeys(r["L1"] for r in summary))
    t_max = max(int(r["T"]) for r in sweep)
    labels = {"gd": "GD (Table 3 lr)", "clipped_gd": "Clipped GD (Table 3 lr, c)",
              S.INEXACT: f"Inexact Polyak (Alg. 1, T = {t_max})"}
    cell = {(r["method"], r["L1"]): r for r in summary}
    initial = ", ".join(f"{float(cell[('gd', l1)]['initial_gap']):.3g}" for l1 in l1s)
    lines = [conditions_line(info, "synthetic_"), "",
             f"f(x) − f* at the end (Inexact Polyak: best iterate at T = {t_max}); f(x0) − f* = "
             f"{initial} for L1 = {', '.join(l1s)}:", "",
             "| method | iterations | " + " | ".join(f"L1 = {v}" for v in l1s) + " |",
             "|" + "---|" * (2 + len(l1s))]
    for m in list(S.TRAJECTORY_METHODS) + [S.INEXACT]:
        rows = [cell[(m, l1)] for l1 in l1s]
        lines.append(f"| {labels.get(m, S.LABELS[m])} | {rows[0]['iterations']} | "
                     + " | ".join(f"{float(r['final_gap']):.1e}" for r in rows) + " |")
    gaps = {(r["L1"], r["T"]): r["best_gap"] for r in sweep}
    lines += ["", "Inexact Polyak, best-iterate f(x_best) − f* for each horizon T (panel f):", "",
              "| T | " + " | ".join(f"L1 = {v}" for v in l1s) + " |",
              "|" + "---|" * (1 + len(l1s))]
    for T in sorted({r["T"] for r in sweep}, key=int):
        lines.append(f"| {T} | " + " | ".join(f"{float(gaps[(l1, T)]):.1e}" for l1 in l1s)
                     + " |")
    return "\n".join(lines) + "\n"


def foreach_csv() -> Path:
    """The committed foreach benchmark (the newest bench/results/foreach_cpu_<date>.csv)."""
    found = sorted(RESULTS.parent.glob("foreach_cpu_*.csv"))
    if not found:
        raise FileNotFoundError(f"no foreach_cpu_*.csv in {RESULTS.parent}")
    return found[-1]


def foreach_block(path: Path | None = None) -> str:
    """The README's CPU table of the foreach path against torch's optimizers, from a CSV of
    `python -m bench.foreach_benchmark`: ms per step on each layout, the ratio to torch's
    clip_grad_norm_ + SGD, the bytes per parameter and the peak extra memory."""
    path = Path(path) if path is not None else foreach_csv()
    rows = _csv(path.parent, path.name)
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    by = {(r["layout"], r["label"]): r for r in rows}
    labels = list(dict.fromkeys(r["label"] for r in rows))
    first = rows[0]
    n = {r["layout"]: int(r["n_params"]) for r in rows}
    head = ["| step |"] + [f" {lay} ({_params(n[lay])}): ms | x clip+SGD |" for lay in layouts]
    md = path.with_suffix(".md")
    machine = [line[2:].strip() for line in (md.read_text().splitlines() if md.exists() else [])
               if line.startswith(("- CPU:", "- load average"))]
    lines = [
        f"`python -m bench.foreach_benchmark`, {first['date']}"
        + "".join(f"; {m}" for m in machine) + f"; float32, "
        f"torch {first['torch']}, median of {first['reps']} steps "
        f"([{path.name}](bench/results/{path.name}), whose .md has the conditions, the floors "
        f"and the targets)."
        + (f" x clip+SGD: the median over {first['rounds']} rounds of the step's time over "
           f"torch's clip + SGD timed in the same round." if first.get("rounds") else "")
        + f" B/param: the bytes each step reads and writes per parameter, counted "
        f"per op and compiled loop; extra MB: its peak resident memory beyond the tensors and "
        f"the state.",
        "",
        "".join(head) + " B/param | extra MB |",
        "|---|" + "---|---|" * len(layouts) + "---|---|",
    ]
    for label in labels:
        cells = [f"| {label} |"]
        for lay in layouts:
            r = by.get((lay, label))
            cells.append(" | |" if r is None else
                         f" {_fmt_ms(float(r['median_ms']))} | {float(r['ratio_clip_sgd']):.2f} |")
        r = next(by[(lay, label)] for lay in layouts if (lay, label) in by)
        cells.append(f" {float(r['bytes_per_param']):.0f} | {r['peak_extra_mb'] or '-'} |")
        lines.append("".join(cells))
    return "\n".join(lines) + "\n"


def results_blocks(folder: Path = RESULTS) -> dict[str, str]:
    """{block name: markdown} for every results block (the foreach table comes from the
    committed foreach benchmark, whatever the folder)."""
    return {"gpt": gpt_block(folder), "synthetic": synthetic_block(folder),
            "foreach": foreach_block()}


def readme_blocks(text: str) -> dict[str, str]:
    """{name: the text between its markers} for each results block present in `text`."""
    found = {}
    for name in BLOCKS:
        start, end = markers(name)
        i, j = text.find(start), text.find(end)
        if i >= 0 and j > i:
            found[name] = text[i + len(start):j].strip("\n") + "\n"
    return found


def update_readme(path, folder: Path = RESULTS, check: bool = False) -> list[str]:
    """Replace the text between each pair of results markers of `path` with the block the CSVs
    of `folder` give. Returns the names of the blocks that differed (check=True: the file is
    left alone). Blocks without markers in the file are skipped."""
    path = Path(path)
    text = path.read_text()
    blocks = results_blocks(folder)
    stale = []
    for name, present in readme_blocks(text).items():
        if present == blocks[name]:
            continue
        stale.append(name)
        start, end = markers(name)
        i, j = text.find(start), text.find(end)
        text = text[:i + len(start)] + "\n" + blocks[name] + text[j:]
    if stale and not check:
        path.write_text(text)
    return stale


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.readme_table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="*", type=Path)
    ap.add_argument("--full", action="store_true", help="one row per optimizer, layout and dtype")
    ap.add_argument("--write", type=Path, default=None,
                    help="also rewrite the bench-table block of this file (e.g. "
                         "docs/benchmarks.md); with --experiments, its results blocks")
    ap.add_argument("--experiments", action="store_true",
                    help="the main job's results blocks (from --folder) instead of a step table")
    ap.add_argument("--folder", type=Path, default=RESULTS,
                    help=f"the experiments' results folder (default {RESULTS})")
    ap.add_argument("--check", type=Path, default=None,
                    help="with --experiments: exit 1 if this file's results blocks are stale")
    a = ap.parse_args(argv)
    if a.experiments:
        return _experiments_main(a)
    if not a.csv:
        ap.error("give step-benchmark CSVs, or --experiments")
    text = make_tables(read_rows(a.csv), full=a.full)
    print(text, end="")
    if a.write is not None:
        if write_block(a.write, text):
            print(f"<!-- rewrote the bench-table block of {a.write} -->", file=sys.stderr)
        else:
            print(f"{a.write} has no {START} ... {END} block: left unchanged", file=sys.stderr)
    return text


def _experiments_main(a) -> str:
    blocks = results_blocks(a.folder)
    text = "\n".join(f"{markers(n)[0]}\n{b}{markers(n)[1]}\n" for n, b in blocks.items())
    if a.check is not None:
        present = readme_blocks(a.check.read_text())
        if not present:
            print(f"{a.check} has no results markers", file=sys.stderr)
            sys.exit(1)
        stale = update_readme(a.check, a.folder, check=True)
        if stale:
            print(f"{a.check}: stale results block(s) {', '.join(stale)}; rerun with --write",
                  file=sys.stderr)
            sys.exit(1)
        print(f"{a.check}: results blocks {', '.join(present)} match {a.folder}")
        return text
    print(text, end="")
    if a.write is not None:
        stale = update_readme(a.write, a.folder)
        print(f"<!-- {a.write}: rewrote {', '.join(stale) or 'no'} results block(s) -->",
              file=sys.stderr)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
