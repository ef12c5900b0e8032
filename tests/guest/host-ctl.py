#!/usr/bin/env python3
"""Host side of the guest-driver tier's control channel (tests/guest/run.sh).

Listens on a unix socket that QEMU's second serial port (the guest's /dev/ttyS1) connects to.
guest-traffic writes one checkpoint line each time the daemon's state is known (BOOT, ATTACHED,
MAPPED, UNMAPPED, CLOSED, SHARED-*, END); for each, this script reads the daemon's control socket
(`state` JSON, `metrics` Prometheus text), prints `PASS: name` or `FAIL: name: why`, and answers
`go`. `KMSG <level> <text>` lines (the guest kernel log) are collected and checked at END.

Exit status: 0 if every check passed and the guest reached END, 1 otherwise.
"""

import argparse
import json
import re
import socket
import sys
import time

PAGE = 4096


class Checks:
    def __init__(self, prefix):
        self.prefix = prefix
        self.failed = 0
        self.passed = 0

    def check(self, name, why):
        """why: None (pass) or the reason of the failure."""
        name = f"{self.prefix}: {name}"
        if why is None:
            self.passed += 1
            print(f"PASS: {name}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL: {name}: {why}", flush=True)
        return why is None


def ask(path, cmd):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.sendall(cmd.encode() + b"\n")
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    s.close()
    return out.decode()


def metrics(path):
    m = {}
    for line in ask(path, "metrics").splitlines():
        g = re.match(r'viommu_requests_total\{type="(\w+)",status="(\w+)"\} (\d+)$', line)
        if g:
            m[(g[1], g[2])] = int(g[3])
            continue
        g = re.match(r"(viommu_\w+_total) (\d+)$", line)
        if g:
            m[g[1]] = int(g[2])
    return m


def merged(intervals):
    """Sorted half-open [start, end) intervals with touching ones merged."""
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [tuple(x) for x in out]


def parse_runs(tokens):
    runs = []
    for t in tokens:
        iova, gpa, length = (int(x, 16) for x in t.split(":"))
        runs.append((iova, gpa, length))
    return runs


def compare_mappings(dom, runs):
    """None if the domain's mappings cover exactly the runs' IOVAs and translate each run's IOVA
    to its guest-physical pages, read+write; else the reason."""
    maps = dom["mappings"]
    have = merged((m["start"], m["end"] + 1) for m in maps)
    want = merged((i, i + n) for i, _, n in runs)
    if have != want:
        fmt = lambda iv: " ".join(f"[{s:#x},{e:#x})" for s, e in iv) or "none"
        return f"domain {dom['id']} maps {fmt(have)}, the guest mapped {fmt(want)}"
    for m in maps:
        if not (m["read"] and m["write"]):
            return f"mapping {m['start']:#x}-{m['end']:#x} is not read+write: {m}"
    for iova, gpa, n in runs:
        for m in maps:
            s, e = max(iova, m["start"]), min(iova + n, m["end"] + 1)
            if s >= e:
                continue
            if m["gpa"] + (s - m["start"]) != gpa + (s - iova):
                return (f"IOVA {s:#x} translates to {m['gpa'] + (s - m['start']):#x} in the daemon, "
                        f"the guest's page is at {gpa + (s - iova):#x}")
    return None


class Controller:
    def __init__(self, args):
        self.a = args
        self.c = Checks(args.name)
        self.ep = {}  # bdf -> endpoint id
        for e in args.endpoint:
            bdf, eid = e.split("=")
            self.ep[bdf if bdf.count(":") == 2 else "0000:" + bdf] = int(eid)
        self.boot_domain = {}
        self.ioas_domain = {}
        self.kmsg = []
        self.ended = False
        self.last = {}

    def deltas(self, what, who):
        """Prints which requests the driver sent since the previous checkpoint."""
        m = metrics(self.a.control)
        d = {k: v - self.last.get(k, 0) for k, v in m.items() if isinstance(k, tuple) and v != self.last.get(k, 0)}
        self.last = m
        txt = ", ".join(f"{t}{'' if s == 'ok' else '/' + s} +{n}" for (t, s), n in sorted(d.items())) or "none"
        print(f"[host-ctl] {self.a.name}: requests before {what} {who}: {txt}", flush=True)

    def state(self):
        s = json.loads(ask(self.a.control, "state"))
        s["dom"] = {d["id"]: d for d in s["domains"]}
        s["epd"] = {e["id"]: e["domain"] for e in s["endpoints"]}
        return s

    def domain_of(self, st, bdf):
        """(domain dict, None) or (None, why)."""
        eid = self.ep.get(bdf)
        if eid is None:
            return None, f"{bdf} is not a known endpoint ({self.ep})"
        if eid not in st["epd"]:
            return None, f"endpoint {eid} ({bdf}) is not in the daemon's state"
        did = st["epd"][eid]
        if did is None:
            return None, f"endpoint {eid} ({bdf}) is not attached"
        if did not in st["dom"]:
            return None, f"endpoint {eid} ({bdf}) is attached to domain {did}, which is not listed"
        return st["dom"][did], None

    def expect_domain(self, st, bdf, kind, empty=True, not_id=None, is_id=None):
        d, why = self.domain_of(st, bdf)
        if why:
            return None, why
        if d["kind"] != kind:
            return d, f"endpoint {self.ep[bdf]} is in domain {d['id']} of kind {d['kind']}, expected {kind}"
        if empty and kind == "Paging" and d["mappings"]:
            return d, f"domain {d['id']} holds {len(d['mappings'])} mapping(s), expected none"
        if not_id is not None and d["id"] == not_id:
            return d, f"endpoint {self.ep[bdf]} is still in domain {d['id']}"
        if is_id is not None and d["id"] != is_id:
            return d, f"endpoint {self.ep[bdf]} is in domain {d['id']}, expected {is_id}"
        return d, None

    def on_line(self, line):
        words = line.split()
        if not words:
            return False
        what = words[0]
        if what == "KMSG":
            parts = line.split(" ", 2)
            self.kmsg.append((int(parts[1]) if parts[1].isdigit() else 7, parts[2] if len(parts) > 2 else ""))
            return False
        st = self.state()
        self.deltas(what, words[1] if len(words) > 1 and what != "BOOT" else "")
        c = self.c
        boot = self.a.boot
        if what == "BOOT":
            bdfs = words[1].split(",") if len(words) > 1 else []
            c.check("guest reports both endpoints", None if sorted(bdfs) == sorted(self.ep) else f"guest: {bdfs}, expected {sorted(self.ep)}")
            for bdf in sorted(self.ep):
                d, why = self.expect_domain(st, bdf, boot)
                c.check(f"boot: endpoint {self.ep[bdf]} ({bdf}) in a {boot} default domain"
                        + (f" (domain {d['id']})" if d and not why else ""), why)
                if d:
                    self.boot_domain[bdf] = d["id"]
            m = metrics(self.a.control)
            n = len(self.ep)
            for t in ("probe", "attach"):
                k = m.get((t, "ok"), 0)
                c.check(f"boot: {t.upper()} requests answered OK (metrics: {k})",
                        None if k >= n else f"{k} < {n} endpoints")
            c.check("boot: failed_requests == 0", None if st["failed_requests"] == 0 else f"failed_requests = {st['failed_requests']}")
        elif what == "ATTACHED":
            bdf = words[1]
            d, why = self.expect_domain(st, bdf, "Paging", not_id=self.boot_domain.get(bdf))
            c.check(f"{bdf}: IOAS attach moved endpoint {self.ep.get(bdf)} to a new empty paging domain"
                    + (f" (domain {d['id']})" if d and not why else ""), why)
            if d:
                self.ioas_domain[bdf] = d["id"]
        elif what in ("MAPPED", "SHARED-MAPPED"):
            bdfs = words[1].split(",")
            runs = parse_runs(words[2:])
            total = sum(n for _, _, n in runs)
            doms = set()
            for bdf in bdfs:
                d, why = self.expect_domain(st, bdf, "Paging", empty=False)
                if what == "MAPPED" and d and not why and d["id"] != self.ioas_domain.get(bdf):
                    why = f"endpoint moved from domain {self.ioas_domain.get(bdf)} to {d['id']}"
                if d and not why:
                    doms.add(d["id"])
                    why = compare_mappings(d, runs)
                c.check(f"{'shared: ' if what != 'MAPPED' else ''}{bdf}: while the guest holds {total:#x} bytes "
                        f"in {len(runs)} run(s), endpoint {self.ep.get(bdf)}'s domain maps exactly those IOVAs to the guest's pages"
                        + (f" (domain {d['id']}, {len(d['mappings'])} mappings)" if d and not why else ""), why)
                if d:
                    self.ioas_domain[bdf] = d["id"]
            if what == "SHARED-MAPPED":
                c.check("shared: both endpoints in one domain",
                        None if len(doms) == 1 else f"domains {sorted(doms)}")
        elif what in ("UNMAPPED", "SHARED-UNMAPPED"):
            for bdf in words[1].split(","):
                d, why = self.expect_domain(st, bdf, "Paging", is_id=self.ioas_domain.get(bdf))
                c.check(f"{'shared: ' if what != 'UNMAPPED' else ''}{bdf}: after IOAS_UNMAP the domain holds no mapping", why)
        elif what in ("CLOSED", "SHARED-CLOSED"):
            for bdf in words[1].split(","):
                d, why = self.expect_domain(st, bdf, boot, is_id=self.boot_domain.get(bdf))
                c.check(f"{'shared: ' if what != 'CLOSED' else ''}{bdf}: after close, endpoint {self.ep.get(bdf)} is back in its default domain", why)
                old = self.ioas_domain.get(bdf)
                c.check(f"{'shared: ' if what != 'CLOSED' else ''}{bdf}: the emptied IOAS domain {old} is destroyed",
                        None if old not in st["dom"] else f"domain {old} still exists: {st['dom'][old]}")
        elif what == "END":
            self.ended = True
            self.final(st)
        else:
            c.check(f"known checkpoint {what!r}", "unknown")
        return True

    def final(self, st):
        c = self.c
        m = metrics(self.a.control)
        for t in ("probe", "attach", "map", "unmap"):
            k = m.get((t, "ok"), 0)
            c.check(f"end: {t.upper()} OK counter > 0 (metrics: {k})", None if k > 0 else "0")
        bad = {k: v for k, v in m.items() if isinstance(k, tuple) and k[1] != "ok" and v}
        c.check("end: failed_requests == 0", None if st["failed_requests"] == 0 and not bad
                else f"failed_requests = {st['failed_requests']}, non-OK counters {bad}")
        for k in ("viommu_malformed_chains_total", "viommu_unknown_requests_total"):
            c.check(f"end: {k} == 0", None if m.get(k, 0) == 0 else f"{m.get(k)}")
        c.check("end: no mapping left in any domain", None if st["mappings"] == 0 else f"{st['mappings']} mappings")
        print(f"[host-ctl] {self.a.name}: metrics: " + ", ".join(
            f"{k[0]}/{k[1]}={v}" for k, v in sorted(m.items(), key=str) if isinstance(k, tuple)), flush=True)
        self.check_kmsg()

    def check_kmsg(self):
        c = self.c
        log = self.kmsg
        c.check(f"kernel log received ({len(log)} records)", None if len(log) > 20 else "too few records")
        probe = [t for _, t in log if re.match(r"virtio_iommu virtio\d+: ", t)]
        ia = [t for t in probe if "input address:" in t]
        pm = [t for t in probe if "page mask:" in t]
        c.check("virtio_iommu probed the device and read its config ("
                + "; ".join(x.split(": ", 1)[1] for x in ia + pm) + ")",
                None if ia and pm else f"no 'input address'/'page mask' lines; virtio_iommu said: {probe}")
        bad = [(lvl, t) for lvl, t in log if lvl <= 4 and re.search(r"iommu", t, re.I)]
        c.check("no error/warning (level <= 4) kernel line about iommu/virtio_iommu",
                None if not bad else "; ".join(f"<{lvl}> {t}" for lvl, t in bad))
        for bdf in sorted(self.ep):
            g = [t for _, t in log if re.match(rf"pci {re.escape(bdf)}: Adding to iommu group \d+", t)]
            c.check(f"{bdf} added to an IOMMU group" + (f" ({g[0].split('group ')[1]})" if g else ""),
                    None if g else "no 'Adding to iommu group' line")
        want_type = {"Paging": "Translated", "Bypass": "Passthrough"}[self.a.boot]
        dt = [t for _, t in log if "Default domain type:" in t]
        c.check(f"default domain type {want_type}", None if any(want_type in t for t in dt) else f"kernel says {dt}")
        if self.a.policy != "any":
            pol = [t for _, t in log if "TLB invalidation policy" in t]
            c.check(f"DMA TLB invalidation policy {self.a.policy}",
                    None if any(f"{self.a.policy} mode" in t for t in pol) else f"kernel says {pol}")
        splat = [t for _, t in log if re.match(r"(WARNING: |BUG: |Oops|Kernel panic|general protection fault)", t)]
        c.check("no kernel WARNING/BUG/Oops splat", None if not splat else "; ".join(splat))
        warn = [(lvl, t) for lvl, t in log if lvl <= 4]
        for lvl, t in warn:
            print(f"[host-ctl] {self.a.name}: guest kernel <{lvl}>: {t}", flush=True)

    def run(self):
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(self.a.listen)
        srv.listen(1)
        srv.settimeout(self.a.timeout)
        deadline = time.monotonic() + self.a.timeout
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            self.c.check("QEMU connected the control serial port", "timeout")
            return 1
        buf = b""
        checkpoints = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.c.check("guest reached END in time", f"timeout after {self.a.timeout} s ({checkpoints} checkpoints)")
                conn.close()
                return 1
            conn.settimeout(left)
            try:
                b = conn.recv(65536)
            except socket.timeout:
                continue
            if not b:
                break
            buf += b
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode(errors="replace").strip()
                try:
                    reply = self.on_line(line)
                except Exception as e:  # a broken daemon answer is a failed check, not a crash
                    self.c.check(f"checkpoint {line.split(' ')[0]!r}", f"{type(e).__name__}: {e}")
                    reply = not line.startswith("KMSG")
                if reply:
                    checkpoints += 1
                    conn.sendall(b"go\n")
            if self.ended:
                break
        if not self.ended:
            self.c.check("guest reached END", f"control channel closed after {checkpoints} checkpoints")
        conn.close()
        print(f"[host-ctl] {self.a.name}: {self.c.passed} passed, {self.c.failed} failed", flush=True)
        return 1 if self.c.failed or not self.ended else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, help="unix socket QEMU's serial chardev connects to")
    p.add_argument("--control", required=True, help="the daemon's control socket")
    p.add_argument("--endpoint", action="append", default=[], help="BDF=ID (guest PCI address = endpoint id)")
    p.add_argument("--boot", choices=["Paging", "Bypass"], required=True, help="expected default domain kind")
    p.add_argument("--policy", choices=["strict", "lazy", "any"], default="any")
    p.add_argument("--name", default="guest")
    p.add_argument("--timeout", type=float, default=180)
    sys.exit(Controller(p.parse_args()).run())


if __name__ == "__main__":
    main()
