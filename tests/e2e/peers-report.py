#!/usr/bin/env python3
"""Summarises a peer-comparison run (tests/e2e/peers.sh): reads the L1 console log, where L2's
`BENCH config=C mode=M workload=W ... key=value` lines appear once per round, and writes

- a Markdown table (stdout, and FILE.md with --out FILE): per workload and mode the median over
  the rounds of each configuration, with the rounds' range, and the ratios to (a) no vIOMMU and
  of (d) the daemon to (b) QEMU virtio-iommu and (c) QEMU intel-iommu, oriented so that > 1
  means the daemon is better;
- an SVG bar chart (FILE.svg) of (d)/(b) and (d)/(c) per row.

Only the Python standard library is used.
"""

import argparse
import re
import statistics
import sys

CONFIGS = {
    "a": "no vIOMMU",
    "b": "QEMU virtio-iommu",
    "c": "QEMU intel-iommu",
    "d": "vhost-user-iommu",
}
# The figure of merit of each workload and whether higher is better.
METRIC = {
    "nvme-randread-4k-qd1": ("iops", True),
    "nvme-randread-4k-qd32": ("iops", True),
    "nvme-seqread-128k": ("mbps", True),
    "nic-tcp-echo-4m": ("mbps", True),
    "ioas-map-unmap-4k": ("p50_us", False),
    # The same on an IOAS no device is attached to: L2's own share, no vIOMMU request.
    "ioas-map-unmap-4k-floor": ("p50_us", False),
}
LINE = re.compile(r"BENCH (config=\S+ .*)$")
CPU = re.compile(r"PEERS-L1: config (\S+) round (\d+) cpu: qemu ([\d.]+) s(?:, daemon ([\d.]+) s)? over ([\d.]+) s")
DAEMON = re.compile(r"PEERS-L1: config (\S+) round (\d+) daemon: (.*)$")


def parse_costs(paths):
    """Per configuration: a list of per-round dicts with the L1 CPU seconds of QEMU and the
    daemon, the run's wall seconds and the daemon's counters (rounds of every console)."""
    costs = {}
    for i, path in enumerate(paths):
        parse_costs_of(path, i, costs)
    return {c: list(rounds.values()) for c, rounds in costs.items()}


def parse_costs_of(path, run, costs):
    with open(path, errors="replace") as f:
        for line in f:
            m = CPU.search(line)
            if m:
                c, r = m.group(1), (run, m.group(2))
                row = costs.setdefault(c, {}).setdefault(r, {})
                row["qemu"] = float(m.group(3))
                row["daemon"] = float(m.group(4)) if m.group(4) else 0.0
                row["wall"] = float(m.group(5))
                continue
            m = DAEMON.search(line)
            if m:
                row = costs.setdefault(m.group(1), {}).setdefault((run, m.group(2)), {})
                for kv in m.group(3).split():
                    k, _, v = kv.partition("=")
                    row[k] = float(v)


def cost_table(costs, order):
    out = [
        "| configuration | L1 CPU s, QEMU | L1 CPU s, daemon | CPU per wall second | "
        "requests found by polling | found by polling after a device interrupt | wake-ups by a kick | "
        "daemon service time, mean µs | of it in iommufd ioctls, µs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in order:
        rows = [r for r in costs.get(c, []) if "wall" in r]
        if not rows:
            continue
        q = statistics.median(r["qemu"] for r in rows)
        d = statistics.median(r["daemon"] for r in rows)
        share = statistics.median((r["qemu"] + r["daemon"]) / r["wall"] for r in rows if r["wall"])
        hits = sum(r.get("viommu_poll_hits_total", 0) for r in rows)
        wakes = sum(r.get("viommu_wakeups_total", 0) for r in rows)
        irq_hits = sum(r.get("viommu_irq_poll_hits_total", 0) for r in rows)
        # The polls and interrupt wake-ups behind the hits, from the rounds that count them.
        counted = [r for r in rows if "viommu_irq_wakes_total" in r]
        irq = f"{irq_hits:.0f}"
        if any(r["viommu_irq_wakes_total"] for r in counted):
            irq += (f" ({sum(r['viommu_irq_poll_hits_total'] for r in counted):.0f} of "
                    f"{sum(r['viommu_irq_polls_total'] for r in counted):.0f} polls after "
                    f"{sum(r['viommu_irq_wakes_total'] for r in counted):.0f} interrupt wake-ups"
                    + (f", {len(counted)} of {len(rows)} rounds" if len(counted) < len(rows) else "")
                    + ")")
        n = sum(r.get("viommu_request_latency_seconds_count", 0) for r in rows)
        svc = sum(r.get("viommu_request_latency_seconds_sum", 0) for r in rows) / n * 1e6 if n else None
        io_rows = [r for r in rows if "viommu_backend_ioctl_seconds_sum" in r]
        io_n = sum(r.get("viommu_request_latency_seconds_count", 0) for r in io_rows)
        io = (sum(r["viommu_backend_ioctl_seconds_sum"] for r in io_rows) / io_n * 1e6
              if io_n else None)
        # The service time of the same rounds, so that the share compares like with like.
        io_svc = (sum(r.get("viommu_request_latency_seconds_sum", 0) for r in io_rows) / io_n * 1e6
                  if io_n else None)
        daemon = c.startswith("d")
        out.append(
            f"| {label(c)} | {q:.1f} | {d:.1f} | {share:.2f} | "
            + (f"{hits:.0f} | {irq} | {wakes:.0f} | {svc:.0f} | {'–' if io is None else f'{io:.0f} of {io_svc:.0f}'} |"
               if daemon and svc is not None else "– | – | – | – | – |")
        )
    out.append("")
    out.append("Medians over the rounds of L1 CPU seconds used by L1's QEMU (which runs the vIOMMU of"
               " (b) and (c)) and by the daemon, from L2's start to the end of its benchmark, and"
               " their sum per wall-clock second (L1 has 2 vCPUs); the daemon's counters are summed"
               " over the rounds; its ioctl time is the iommufd ioctls' total per request served,"
               " 'X of Y' against the service time of the rounds that report it.")
    return "\n".join(out)


def parse(paths):
    runs = {}
    errors = []
    for path in paths:
        parse_of(path, runs, errors)
    return runs, errors


def parse_of(path, runs, errors):
    with open(path, errors="replace") as f:
        for line in f:
            if "BENCH-ERROR" in line:
                errors.append(line.split("BENCH-ERROR", 1)[1].strip())
                continue
            m = LINE.search(line)
            if not m:
                continue
            kv = dict(w.split("=", 1) for w in m.group(1).split() if "=" in w)
            key = (kv["workload"], kv["mode"])
            runs.setdefault(key, {}).setdefault(kv["config"], []).append(kv)


def value(kv, workload):
    name, _ = METRIC[workload]
    return float(kv[name])


def ratio(x, y, higher_better):
    """How much better x is than y (> 1: x is better)."""
    if not x or not y:
        return None
    return x / y if higher_better else y / x


def num(v):
    """Three significant digits, no exponent for the sizes seen here."""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def fmt(r):
    return "–" if r is None else f"{r:.2f}"


def label(c):
    """The heading of configuration c (dN: the daemon with an N µs polling window)."""
    if c in CONFIGS:
        return f"({c}) {CONFIGS[c]}"
    if c == "dirq":
        return "(dirq) daemon, polling after device interrupts"
    if c == "dnoirq":  # consoles of the runs where polling after interrupts was the default
        return "(dnoirq) daemon, no polling after device interrupts"
    return f"({c}) daemon, poll {c[1:]} µs"


def configs_of(runs):
    """a, b, c, d in that order, then the daemon's variants dN by N."""
    seen = {c for per in runs.values() for c in per}
    extra = sorted((c for c in seen if c not in CONFIGS and c[:1] == "d" and c[1:].isdigit()),
                   key=lambda c: int(c[1:]))
    return list("abcd") + extra + [c for c in ("dirq", "dnoirq") if c in seen]


def table(runs):
    rows = []
    cfgs = configs_of(runs)
    daemons = [c for c in cfgs if c[0] == "d"]
    out = [
        "| workload | mode | metric | " + " | ".join(label(c) for c in cfgs) + " | "
        + " | ".join(f"({c})/(a)" for c in cfgs[1:]) + " | "
        + " | ".join(f"({d}) vs (b) | ({d}) vs (c)" for d in daemons) + " |",
        "|---" * (3 + len(cfgs) + len(cfgs) - 1 + 2 * len(daemons)) + "|",
    ]
    order = list(METRIC)
    modes = ["none", "strict", "lazy", "user"]
    keys = sorted(runs, key=lambda k: (order.index(k[0]) if k[0] in order else 99, modes.index(k[1]) if k[1] in modes else 9))
    for workload, mode in keys:
        if workload not in METRIC:
            continue
        name, higher = METRIC[workload]
        per = runs[(workload, mode)]
        med = {}
        cells = []
        for c in cfgs:
            vals = [value(kv, workload) for kv in per.get(c, [])]
            if not vals:
                med[c] = None
                cells.append("–")
                continue
            med[c] = statistics.median(vals)
            cells.append(f"{num(med[c])} ({num(min(vals))}–{num(max(vals))}, n={len(vals)})")
        # (a) has no IOMMU, so its one mode ("none") is the baseline of every mode.
        base = med.get("a")
        if base is None:
            base_vals = [value(kv, workload) for kv in runs.get((workload, "none"), {}).get("a", [])]
            base = statistics.median(base_vals) if base_vals else None
            if base is not None:
                cells[0] = f"{num(base)} (mode none)"
        r = [ratio(med[c], base, higher) for c in cfgs[1:]]
        vs = []
        for d in daemons:
            db = ratio(med[d], med["b"], higher)
            dc = ratio(med[d], med["c"], higher)
            vs += [db, dc]
            if not workload.endswith("-floor"):
                rows.append((workload, mode, d, db, dc))
        unit = {"iops": "IOPS", "mbps": "MB/s", "p50_us": "p50 µs (lower is better)"}[name]
        out.append(
            f"| {workload} | {mode} | {unit} | " + " | ".join(cells) + " | "
            + " | ".join(fmt(x) for x in r) + " | " + " | ".join(fmt(x) for x in vs) + " |"
        )
    out.append("")
    out.append("Ratios of configurations to (a) are throughput-like (> 1: faster than no vIOMMU);"
               " '(d) vs (b)' and '(d) vs (c)' are > 1 where the daemon is better.")
    return "\n".join(out), rows


def share_table(runs):
    """The L2 userspace row minus its floor, per configuration: what the vIOMMU itself adds to a
    MAP+UNMAP pair (medians over the rounds; None where a configuration lacks either row)."""
    row = runs.get(("ioas-map-unmap-4k", "user"), {})
    floor = runs.get(("ioas-map-unmap-4k-floor", "user"), {})
    cfgs = [c for c in configs_of(runs) if c in row and c in floor]
    if not cfgs:
        return None
    out = [
        "| configuration | MAP+UNMAP p50 µs | floor p50 µs (no device) | vIOMMU share µs | "
        "(d) vs this, share |",
        "|---|---:|---:|---:|---:|",
    ]
    share = {}
    for c in cfgs:
        r = statistics.median(float(kv["p50_us"]) for kv in row[c])
        f = statistics.median(float(kv["p50_us"]) for kv in floor[c])
        share[c] = (r, f, r - f)
    d = share.get("d")
    for c in cfgs:
        r, f, x = share[c]
        vs = fmt(x / d[2]) if d and c != "d" and d[2] > 0 and x > 0 else "–"
        out.append(f"| {label(c)} | {r:.0f} | {f:.0f} | {x:.0f} | {vs} |")
    out.append("")
    out.append("The floor is the same pair on an IOAS no device is attached to (L2's syscall,"
               " pinning and iommufd bookkeeping; it reaches no vIOMMU); the share is the row"
               " minus the floor; '(d) vs this' > 1 where the daemon's share is smaller.")
    return "\n".join(out)


def svg(rows):
    rows = [r for r in rows if r[3] is not None or r[4] is not None]
    bar_h, gap, left, width = 14, 10, 260, 420
    scale = width / 2.0  # 2.0x at the right edge
    h = 40 + len(rows) * (2 * bar_h + gap) + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 60}" height="{h}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="10" y="18" font-size="13">vhost-user-iommu vs QEMU\'s vIOMMUs (> 1: daemon better; '
        'median over rounds)</text>',
    ]
    y = 34
    x1 = left + scale
    for workload, mode, d, db, dc in rows:
        name = f"{workload} ({mode})" if d == "d" else f"{workload} ({mode}, {d})"
        parts.append(f'<text x="10" y="{y + bar_h + 4}">{name}</text>')
        for r, colour, label in ((db, "#4878a8", "vs virtio-iommu"), (dc, "#c0504d", "vs intel-iommu")):
            if r is not None:
                w = min(r, 2.0) * scale
                parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" fill="{colour}"/>')
                parts.append(f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 4}">{r:.2f} {label}</text>')
            y += bar_h
        y += gap
    parts.append(f'<line x1="{x1}" y1="28" x2="{x1}" y2="{y}" stroke="black" stroke-dasharray="4,3"/>')
    parts.append(f'<text x="{x1 - 8}" y="{y + 14}">1.0</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("console", nargs="+",
                    help="the L1 console log of a peers.sh run (several: their rounds pooled)")
    ap.add_argument("--out", help="write OUT.md and OUT.svg")
    a = ap.parse_args()
    runs, errors = parse(a.console)
    if not runs:
        sys.exit(f"{' '.join(a.console)}: no BENCH lines")
    md, rows = table(runs)
    share = share_table(runs)
    if share:
        md += "\n\n" + share
    costs = parse_costs(a.console)
    if costs:
        md += "\n\n" + cost_table(costs, configs_of(runs))
    if errors:
        md += "\n\nErrors:\n" + "\n".join(f"- {e}" for e in errors)
    print(md)
    if a.out:
        with open(a.out + ".md", "w") as f:
            f.write(md + "\n")
        with open(a.out + ".svg", "w") as f:
            f.write(svg(rows) + "\n")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
