#!/usr/bin/env python3
"""Draws issue 19's scale curves as one SVG from the raw outputs of the commands that measure them.

    python3 benches/scale-plot.py --vm-log CONSOLE.log --sweep SWEEP.md -o docs/bench/scale.svg

--vm-log: the VM tier's console log of a bench-iommufd run (its "staging, map path" connect-cost
table and its "bench-iommufd state" table); --sweep: the output of
`vhost-user-iommu bench --state-sweep ...` (soft backend, over the socket). Three panels:
connect cost against guest RAM (set_ram ms, per staging setting), MAP p50 against live
mappings (real iommufd and soft backend), and one UNMAP covering all live mappings.
"""

import argparse
import math
import re
import sys


def tables(text):
    """Every Markdown table in `text`: (header cells, [row cells])."""
    out, cur = [], None
    for line in text.splitlines():
        line = re.sub(r"^.*?(?=\|)", "", line, count=1) if "|" in line else line
        if not line.startswith("|"):
            cur = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cur is None:
            cur = (cells, [])
            out.append(cur)
        elif not all(re.fullmatch(r"-+:?|:?-+", c) for c in cells):
            cur[1].append(cells)
    return out


def find(all_tables, first_header):
    for head, rows in all_tables:
        if head and head[0] == first_header:
            return head, rows
    sys.exit(f"no table whose first column is {first_header!r}")


def col(head, name):
    for i, h in enumerate(head):
        if h.startswith(name):
            return i
    sys.exit(f"no column {name!r} in {head}")


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def panel(x0, title, xlabel, ylabel, series, logx=False, logy=False, w=300, h=220):
    """One line chart at x offset x0: series = [(name, [(x, y)])]."""
    pts = [p for _, s in series for p in s if (not logx or p[0] > 0) and (not logy or p[1] > 0)]
    fx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    fy = (lambda v: math.log10(v)) if logy else (lambda v: v)
    xs = [fx(p[0]) for p in pts]
    ys = [fy(p[1]) for p in pts]
    xmin, xmax = min(xs), max(xs)
    ymin, ymax = (min(ys), max(ys)) if logy else (0.0, max(ys))
    if xmax == xmin:
        xmax += 1
    if ymax == ymin:
        ymax += 1
    left, top = x0 + 62, 40

    def px(v):
        return left + (fx(v) - xmin) / (xmax - xmin) * w

    def py(v):
        return top + h - (fy(v) - ymin) / (ymax - ymin) * h

    o = [
        f'<text x="{left + w / 2}" y="22" text-anchor="middle" font-weight="bold">{title}</text>',
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#888"/>',
        f'<text x="{left + w / 2}" y="{top + h + 34}" text-anchor="middle">{xlabel}</text>',
        f'<text x="{x0 + 12}" y="{top + h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 {x0 + 12} {top + h / 2})">{ylabel}</text>',
    ]
    for v, label in [(xmin, "lo"), (xmax, "hi")]:
        real = 10**v if logx else v
        o.append(f'<text x="{left + (v - xmin) / (xmax - xmin) * w}" y="{top + h + 16}" '
                 f'text-anchor="middle">{real:g}</text>')
    for v in [ymin, ymax]:
        real = 10**v if logy else v
        o.append(f'<text x="{left - 4}" y="{top + h - (v - ymin) / (ymax - ymin) * h + 4}" '
                 f'text-anchor="end">{real:.4g}</text>')
    for k, (name, s) in enumerate(series):
        s = [p for p in s if (not logx or p[0] > 0) and (not logy or p[1] > 0)]
        c = COLORS[k % len(COLORS)]
        path = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in s)
        o.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for a, b in s:
            o.append(f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="3" fill="{c}"/>')
        o.append(f'<text x="{left + 8}" y="{top + 16 + 15 * k}" fill="{c}">{name}</text>')
    return o


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vm-log", required=True)
    ap.add_argument("--sweep", required=True)
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    vm = tables(open(a.vm_log, encoding="utf-8", errors="replace").read())
    sw = tables(open(a.sweep, encoding="utf-8").read())

    head, rows = find(vm, "staging, map path")
    conn = {}
    for r in rows:
        conn.setdefault(r[0], []).append(
            (float(r[col(head, "guest RAM MiB")]), float(r[col(head, "set_ram ms")])))
    head, rows = find(vm, "live mappings")
    iommufd_map = [(float(r[0]), float(r[col(head, "MAP p50")])) for r in rows]
    iommufd_all = [(float(r[0]), float(r[col(head, "one UNMAP of all")])) for r in rows]
    head, rows = find(sw, "live mappings")
    soft_map = [(float(r[0]), float(r[col(head, "MAP p50")])) for r in rows]
    soft_all = [(float(r[0]), float(r[col(head, "one UNMAP of all")])) for r in rows]

    o = ['<svg xmlns="http://www.w3.org/2000/svg" width="1150" height="310" '
         'font-family="sans-serif" font-size="12">',
         '<rect width="100%" height="100%" fill="white"/>']
    o += panel(0, "Connect cost vs guest RAM", "guest RAM, MiB", "set_ram, ms",
               sorted(conn.items()))
    o += panel(380, "MAP p50 vs live mappings", "live mappings (log)", "MAP p50, µs (log)",
               [("real iommufd (VM tier)", iommufd_map), ("soft backend (socket)", soft_map)],
               logx=True, logy=True)
    o += panel(760, "One UNMAP of all live mappings", "live mappings (log)", "ms (log)",
               [("real iommufd (VM tier)", iommufd_all), ("soft backend (socket)", soft_all)],
               logx=True, logy=True)
    o.append("</svg>")
    with open(a.out, "w", encoding="utf-8") as f:
        f.write("\n".join(o) + "\n")


if __name__ == "__main__":
    main()
