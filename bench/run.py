"""The benchmark harness: ``python -m bench [options]`` from the repository root.

Every figure is measured through xmpp-front and, in the same run, directly against the same
server (a legacy Prosody, or the harness's own fast upstream for the proxy's own capacity),
because absolute numbers drift on shared machines and the comparison is what matters.
Progress goes to stderr, the table to stdout, and ``--json PATH`` writes everything.
See docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from proxy.net.xmlstream import HEAP_TRIM_QUIET, PARSER_IDLE
from tests.peers.certs import make_cert
from tests.peers.prosody import LegacyProsody

from . import load, memtrace, procs
from .client import BenchClient, register_many
from .load import Endpoint
from .profile import format_hot_spots, py_spy_available, start_py_spy
from .rules50 import write_fifty_rules

CASES = ("capacity", "rules", "throughput", "latency", "login", "resume", "memory", "restore",
         "workers")
C = TypeVar("C", bound=procs.Child)
PROXY_OWN_FDS = 16  # listeners, epoll, the store, stdio: measured 10 with a few sessions
WARM_SESSIONS = 10  # memory: sessions connected before the baseline RSS is read
# memory: seconds sessions are left idle before the RSS is read; past the time after which
# an idle stream drops its parser, and the heap trim that follows
IDLE_WAIT = max(2.0, PARSER_IDLE + HEAP_TRIM_QUIET + 1.0)

FEATURES = ("carbons", "archive", "blocking", "push")  # --features off


class Bench:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.t0 = time.monotonic()
        if opts.workdir:
            self.workdir = Path(opts.workdir).resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="xmpp-front-bench-"))
        self.cert, self.key = make_cert(self.workdir / "certs", "localhost")
        self.prosody: LegacyProsody | None = None
        self._accounts: list[tuple[str, str]] = []
        self.rows: list[dict[str, Any]] = []
        self.details: dict[str, Any] = {}
        self._spies: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    # -- output -------------------------------------------------------------------------------

    def progress(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    def row(self, case: str, setup: str, figure: str, value: float | int | str | None,
            unit: str = "", vs: str = "", **extra: Any) -> None:
        self.rows.append({"case": case, "setup": setup, "figure": figure, "value": value,
                          "unit": unit, "vs": vs, **extra})

    # -- peers --------------------------------------------------------------------------------

    async def prosody_server(self) -> LegacyProsody:
        if self.prosody is None or not self.prosody.running:
            if self.prosody is None:
                self.prosody = LegacyProsody(self.workdir / "prosody", allow_registration=True)
            self.progress("starting the legacy Prosody")
            await asyncio.to_thread(self.prosody.start)
        return self.prosody

    async def prosody_accounts(self, n: int) -> list[tuple[str, str]]:
        """``n`` accounts on the Prosody (registered in-band the first time they are needed)."""
        server = await self.prosody_server()
        if len(self._accounts) < n:
            new = [(f"bench{i}", f"pw-bench-{i}") for i in range(len(self._accounts), n)]
            self.progress(f"registering {len(new)} accounts in-band")
            await register_many(server.host, server.c2s_port, new, domain=server.domain,
                                connections=8, timeout=60 + len(new) * 0.1)
            self._accounts += new
        return self._accounts[:n]

    def proxy_before_prosody(self, name: str, **overrides: Any) -> procs.Proxy:
        assert self.prosody is not None
        upstream: dict[str, Any] = {
            "port": self.prosody.c2s_port, "domain": self.prosody.domain, "tls": "starttls",
            "verify": True, "ca": str(self.prosody.cert)}
        if self.opts.barrier_every is not None:
            upstream["barrier_every"] = self.opts.barrier_every
        return procs.Proxy(self.workdir / name, self.cert, self.key, upstream, name=name,
                           **self._features(overrides))

    def _features(self, overrides: dict[str, Any]) -> dict[str, Any]:
        if "features" not in overrides:
            off = FEATURES if self.opts.features == "off" else self.opts.off
            if off:
                overrides = {**overrides, "features": {k: "off" for k in off}}
        return overrides

    def proxy_before_fast(self, name: str, upstream: procs.Child, *, tls: bool = False,
                          **overrides: Any) -> procs.Proxy:
        return procs.Proxy(self.workdir / name, self.cert, self.key, {
            "port": upstream.port, "domain": "localhost",
            "tls": "direct" if tls else "none", "verify": True, "ca": str(self.cert)},
            name=name, **self._features(overrides))

    def ep(self, name: str, port: int, *, direct_tls: bool = False,
           watch: procs.Child | None = None, also: dict[str, int] | None = None) -> Endpoint:
        """``watch``: the process of interest (CPU reported); ``also``: more to report."""
        pids = {watch.name: watch.pid} if watch is not None else {}
        pids.update(also or {})
        if self.prosody is not None and self.prosody.pid is not None:
            pids.setdefault("prosody", self.prosody.pid)
        return Endpoint(name, "127.0.0.1", port, direct_tls=direct_tls, watch=pids)

    async def started(self, child: C) -> C:
        t = time.monotonic()
        await asyncio.to_thread(child.start)
        took = time.monotonic() - t
        if took > 1:
            self.progress(f"starting {child.name} took {took:.1f} s")
        return child

    async def stopped(self, child: procs.Child) -> None:
        t = time.monotonic()
        await asyncio.to_thread(child.stop)
        took = time.monotonic() - t
        cpu = f", {child.stop_cpu:.2f} s of CPU" if child.stop_cpu is not None else ""
        self.details.setdefault("stops", []).append({
            "name": child.name, "seconds": child.stop_seconds, "cpu_seconds": child.stop_cpu,
            "killed": child.killed})
        if child.killed:
            self.progress(f"{child.name} did not stop on SIGTERM within {took:.0f} s: "
                          f"killed{cpu}")
            self.details.setdefault("stop_hung", []).append(child.name)
        elif took > 1:
            self.progress(f"stopping {child.name} took {took:.1f} s{cpu}")

    def fake_accounts(self, n: int, prefix: str = "fast") -> list[tuple[str, str]]:
        return [(f"{prefix}{i}", "any") for i in range(n)]

    # -- cases --------------------------------------------------------------------------------

    # The throughput and latency cases: direct, then the proxy in each durability variant
    # (``--durability``) and with stream management off and/or on (``--sm``), ``--repeat``
    # times, interleaved so that drift of a shared machine spreads over every variant.

    def _proxy_runs(self) -> list[tuple[Variant, bool]]:
        variants: list[Variant] = self.opts.durability or [DEFAULT_VARIANT]
        return [(v, sm) for sm in self.opts.sm for v in variants]

    def _durability_proxy(self, case: str, variant: Variant, sm: bool,
                          run: int) -> procs.Proxy:
        mode, fsync = variant
        overrides: dict[str, Any] = {}
        if mode is not None:
            overrides["durability"] = {"mode": mode, "fsync": fsync or "normal"}
        name = f"proxy-{case}"
        if self.opts.durability or len(self.opts.sm) > 1 or self.opts.repeat > 1:
            name += f"-{variant_tag(variant)}{'-sm' if sm else ''}-{run + 1}"
        # stats: the journal's counters (bench/proxystats.py) when durability is compared
        return self.proxy_before_prosody(name, stats=bool(self.opts.durability), **overrides)

    async def case_throughput(self) -> None:
        o = self.opts
        server = await self.prosody_server()
        accounts = await self.prosody_accounts(2 * o.pairs)
        kw = dict(seconds=o.seconds, warmup=o.warmup, window=o.window, batch=o.batch,
                  progress=self.progress)
        directs: list[load.ThroughputResult] = []
        vias: dict[tuple[Variant, bool], list[load.ThroughputResult]] = {
            key: [] for key in self._proxy_runs()}
        for run in range(o.repeat):
            directs.append(await load.throughput(self.ep("prosody", server.c2s_port),
                                                 accounts, **kw))
            for variant, sm in vias:
                proxy = await self.started(self._durability_proxy("throughput", variant, sm,
                                                                  run))
                try:
                    vias[(variant, sm)].append(await load.throughput(
                        self.ep(proxy_label(variant, sm).removeprefix("via "), proxy.port,
                                watch=proxy), accounts,
                        sm=sm, sample=proxy.journal_stats if proxy.stats_path else None,
                        **kw))
                finally:
                    await self.stopped(proxy)
        direct_mps = _median([d.messages_per_s for d in directs])
        self.row("throughput", "direct Prosody", "messages/s", round(direct_mps),
                 vs=f"Prosody CPU {_pct(_median_of(directs, 'prosody'))}{_spread(directs)}",
                 runs=[round(d.messages_per_s) for d in directs])
        details: dict[str, Any] = {"direct": [d.as_dict() for d in directs], "proxy": {},
                                   "pairs": o.pairs, "repeat": o.repeat}
        for (variant, sm), results in vias.items():
            label = proxy_label(variant, sm)
            mps = _median([r.messages_per_s for r in results])
            ratio = mps / direct_mps
            vs = f"{ratio:.1%} of direct"
            memory = vias.get((MEMORY, sm))
            vs_memory = paired = None
            cpu_us = _cpu_per_message(results)
            cpu_vs = ""
            if memory and variant != MEMORY:
                vs_memory = mps / _median([r.messages_per_s for r in memory])
                # run k of this setup against run k of memory: measured a few seconds apart,
                # so the drift of a shared machine cancels more than in the medians
                paired = [r.messages_per_s / m.messages_per_s
                          for r, m in zip(results, memory, strict=True)]
                vs += f"; {vs_memory:.1%} of memory"
                if len(paired) > 1:
                    vs += f" (paired runs {min(paired):.0%}–{max(paired):.0%})"
                cpu_vs = f" ({cpu_us / _cpu_per_message(memory) - 1:+.0%} vs memory)"
            vs += _spread(results)
            self.row("throughput", label, "messages/s", round(mps), vs=vs, ratio=ratio,
                     ratio_memory=vs_memory, paired_ratio_memory=paired,
                     runs=[round(r.messages_per_s) for r in results])
            self.row("throughput", label, "proxy CPU", _pct(_median_of(results, None)),
                     "of one core",
                     vs=f"{cpu_us:.1f} µs per message{cpu_vs}; Prosody CPU "
                        f"{_pct(_median_of(results, 'prosody'))}; harness "
                        f"{_pct(_median_of(results, 'harness'))}", cpu_us_per_message=cpu_us)
            if variant[0] == "journal" and all(r.sampled for r in results):
                self._journal_row("throughput", label, results)
            # With SM the senders' <r/> round trips are in the JSON only: at full speed they
            # measure the queue of up to --window messages ahead of each <r/>, not the
            # journal (the latency case times them at a fixed rate).
            details["proxy"][label] = [r.as_dict() for r in results]
            if (variant, sm) == (DEFAULT_VARIANT, False):
                details["ratio"] = ratio  # the figure the table had before --durability
        self.details["throughput"] = details

    def _journal_row(self, case: str, label: str, results: list[load.ThroughputResult]) -> None:
        """Commits and rows per second over the window, what the writer thread and the disk
        did (medians over the runs)."""
        def per_s(key: str) -> float:
            return _median([r.sampled.get(key, 0.0) / r.seconds for r in results])
        commits, rows = per_s("commits"), per_s("rows_written")
        stanzas = _median([r.messages_per_s for r in results])
        thread = per_s("journal_thread_cpu")
        disk = per_s("disk_write_bytes")
        wal = _median([r.sampled.get("wal_bytes", 0.0) for r in results])
        self.row(case, label, "journal commits/s", round(commits),
                 vs=f"{rows:,.0f} rows/s ({rows / stanzas:.2f} per message); writer thread "
                    f"CPU {_pct(thread)}; disk {disk / 2**20:.1f} MiB/s; WAL "
                    f"{wal / 2**20:.1f} MiB", commits_per_s=commits, rows_per_s=rows,
                 rows_per_message=rows / stanzas, writer_thread_cpu=thread,
                 disk_write_bytes_per_s=disk, wal_bytes=wal)

    def _ack_rows(self, case: str, label: str, runs: list[list[float]]) -> None:
        every: list[float] = [ms for run in runs for ms in run]
        if not every:
            self.row(case, label, "<r/> to <a/> p50", "n/a", "ms", vs="no <a/> came")
            return
        p50s = [load.percentile(r, 50) for r in runs if r]
        p99s = [load.percentile(r, 99) for r in runs if r]
        self.row(case, label, "<r/> to <a/> p50", round(_median(p50s), 3), "ms",
                 vs=f"{len(every)} acks{_range(p50s, 3)}")
        self.row(case, label, "<r/> to <a/> p99", round(_median(p99s), 3), "ms",
                 vs=f"max {max(every):.1f} ms{_range(p99s, 3)}")

    async def case_latency(self) -> None:
        o = self.opts
        server = await self.prosody_server()
        accounts = await self.prosody_accounts(2 * o.pairs)
        kw = dict(rate=o.rate, seconds=o.seconds, warmup=o.warmup, progress=self.progress)
        directs: list[load.LatencyResult] = []
        vias: dict[tuple[Variant, bool], list[load.LatencyResult]] = {
            key: [] for key in self._proxy_runs()}
        for run in range(o.repeat):
            directs.append(await load.latency(self.ep("prosody", server.c2s_port), accounts,
                                              **kw))
            for variant, sm in vias:
                proxy = await self.started(self._durability_proxy("latency", variant, sm, run))
                try:
                    vias[(variant, sm)].append(await load.latency(
                        self.ep(proxy_label(variant, sm).removeprefix("via "), proxy.port),
                        accounts, sm=sm, **kw))
                finally:
                    await self.stopped(proxy)
        rate = f"at {o.rate:g} msg/s"
        d50 = _median([d.p50_ms for d in directs])
        d99 = _median([d.p99_ms for d in directs])
        self.row("latency", "direct Prosody", f"p50 {rate}", round(d50, 3), "ms",
                 _range([d.p50_ms for d in directs], 3).lstrip("; "))
        self.row("latency", "direct Prosody", f"p99 {rate}", round(d99, 3), "ms",
                 _range([d.p99_ms for d in directs], 3).lstrip("; "),
                 samples=sum(d.samples for d in directs))
        details: dict[str, Any] = {"direct": [d.as_dict() for d in directs], "proxy": {}}
        for (variant, sm), results in vias.items():
            label = proxy_label(variant, sm)
            p50 = _median([r.p50_ms for r in results])
            p99 = _median([r.p99_ms for r in results])
            self.row("latency", label, f"p50 {rate}", round(p50, 3), "ms",
                     f"+{p50 - d50:.2f} ms{_range([r.p50_ms for r in results], 3)}")
            self.row("latency", label, f"p99 {rate}", round(p99, 3), "ms",
                     f"+{p99 - d99:.2f} ms{_range([r.p99_ms for r in results], 3)}",
                     samples=sum(r.samples for r in results))
            if sm:
                self._ack_rows("latency", label, [r.ack_ms for r in results])
            details["proxy"][label] = [r.as_dict() for r in results]
            if (variant, sm) == (DEFAULT_VARIANT, False):
                details["added_p50_ms"] = p50 - d50
                details["added_p99_ms"] = p99 - d99
        self.details["latency"] = details

    async def case_login(self) -> None:
        o = self.opts
        server = await self.prosody_server()
        accounts = await self.prosody_accounts(max(2 * o.pairs, o.loggers))
        accounts = accounts[:o.loggers]
        direct = await load.login_rate(self.ep("prosody", server.c2s_port), accounts,
                                       seconds=o.seconds, progress=self.progress)
        proxy = await self.started(self.proxy_before_prosody("proxy-login"))
        try:
            via = await load.login_rate(self.ep("proxy", proxy.port), accounts,
                                        seconds=o.seconds, progress=self.progress)
        finally:
            await self.stopped(proxy)
        ratio = via.logins_per_s / direct.logins_per_s if direct.logins_per_s else float("nan")
        what = f"logins/s ({o.loggers} concurrent)"
        self.row("login", "direct Prosody", what, round(direct.logins_per_s, 1),
                 vs=f"p50 {direct.p50_ms:.1f} ms")
        self.row("login", "via proxy", what, round(via.logins_per_s, 1),
                 vs=f"{ratio:.1%} of direct; p50 {via.p50_ms:.1f} ms", ratio=ratio)
        self.details["login"] = {"direct": direct.as_dict(), "proxy": via.as_dict(),
                                 "ratio": ratio, "loggers": o.loggers}

    async def case_capacity(self) -> None:
        o = self.opts
        kw = dict(seconds=o.seconds, warmup=o.warmup, window=o.window, batch=o.batch,
                  progress=self.progress)
        accounts = self.fake_accounts(2 * o.pairs)
        results: dict[str, load.ThroughputResult] = {}
        upstream = await self.started(procs.fast_upstream(self.workdir / "capacity"))
        relay = relay_tls = proxy = None
        up = {upstream.name: upstream.pid}
        try:
            results["direct"] = await load.throughput(
                self.ep("fast upstream", upstream.port, watch=upstream), accounts, **kw)
            relay = await self.started(procs.byte_relay(self.workdir / "capacity",
                                                        upstream.port))
            results["relay"] = await load.throughput(
                self.ep("byte relay", relay.port, watch=relay, also=up), accounts, **kw)
            await self.stopped(relay)
            relay_tls = await self.started(procs.byte_relay(
                self.workdir / "capacity", upstream.port, cert=self.cert, key=self.key))
            results["relay_tls"] = await load.throughput(
                self.ep("byte relay (TLS)", relay_tls.port, direct_tls=True, watch=relay_tls,
                        also=up), accounts, **kw)
            await self.stopped(relay_tls)
            proxy = await self.started(self.proxy_before_fast("proxy-capacity", upstream))
            results["proxy"] = await load.throughput(
                self.ep("proxy", proxy.port, watch=proxy, also=up), accounts,
                on_window=self._profiler(proxy, "capacity"), **kw)
            self._finish_profile("capacity")
        finally:
            for child in (proxy, relay_tls, relay, upstream):
                if child is not None:
                    await self.stopped(child)
        d, r, rt, p = (results[k] for k in ("direct", "relay", "relay_tls", "proxy"))
        self.row("capacity", "direct fast upstream", "messages/s", round(d.messages_per_s),
                 vs=f"upstream CPU {_pct(d.cpu_share)}")
        self.row("capacity", "byte relay (plain)", "messages/s", round(r.messages_per_s),
                 vs=f"{r.messages_per_s / d.messages_per_s:.1%} of direct; relay CPU "
                    f"{_pct(r.cpu_share)}")
        self.row("capacity", "byte relay (TLS client leg)", "messages/s",
                 round(rt.messages_per_s),
                 vs=f"{rt.messages_per_s / d.messages_per_s:.1%} of direct; relay CPU "
                    f"{_pct(rt.cpu_share)}")
        self.row("capacity", "proxy (TLS client leg)", "messages/s", round(p.messages_per_s),
                 vs=f"{p.messages_per_s / rt.messages_per_s:.1%} of TLS relay")
        stanzas = 2 * p.messages_per_s
        per_core = stanzas / p.cpu_share if p.cpu_share else float("nan")
        self.row("capacity", "proxy (TLS client leg)", "stanzas relayed/s", round(stanzas),
                 vs=f"proxy CPU {_pct(p.cpu_share)}")
        self.row("capacity", "proxy (TLS client leg)", "stanzas per CPU-second", round(per_core),
                 vs="one core, 100% busy")
        self.details["capacity"] = {k: v.as_dict() for k, v in results.items()}
        self.details["capacity"]["proxy_stanzas_per_s"] = stanzas
        self.details["capacity"]["proxy_stanzas_per_cpu_second"] = per_core
        if o.durability:
            await self._capacity_durability(accounts, kw)

    async def _capacity_durability(self, accounts: list[tuple[str, str]],
                                   kw: dict[str, Any]) -> None:
        """The proxy alone (fast upstream, 100% of a core) in each durability variant: here
        the journal's CPU cost is the throughput it costs, with nothing else to hide it."""
        o = self.opts
        upstream = await self.started(procs.fast_upstream(self.workdir / "capacity-durability"))
        vias: dict[tuple[Variant, bool], list[load.ThroughputResult]] = {
            key: [] for key in self._proxy_runs()}
        try:
            for run in range(o.repeat):
                for variant, sm in vias:
                    mode, fsync = variant
                    overrides: dict[str, Any] = {}
                    if mode is not None:
                        overrides["durability"] = {"mode": mode, "fsync": fsync or "normal"}
                    name = (f"proxy-capacity-{variant_tag(variant)}{'-sm' if sm else ''}-"
                            f"{run + 1}")
                    proxy = await self.started(self.proxy_before_fast(
                        name, upstream, stats=True, **overrides))
                    # --profile: the first run of each variant too (the relay without the
                    # journal is where the per-stanza path shows best)
                    tag = f"capacity-{variant_tag(variant)}{'-sm' if sm else ''}"
                    try:
                        vias[(variant, sm)].append(await load.throughput(
                            self.ep(proxy_label(variant, sm).removeprefix("via "),
                                    proxy.port, watch=proxy,
                                    also={upstream.name: upstream.pid}),
                            accounts, sm=sm, sample=proxy.journal_stats,
                            on_window=self._profiler(proxy, tag) if run == 0 else None,
                            **kw))
                        self._finish_profile(tag)
                    finally:
                        await self.stopped(proxy)
        finally:
            await self.stopped(upstream)
        details: dict[str, Any] = {}
        for (variant, sm), results in vias.items():
            label = proxy_label(variant, sm).replace("via proxy", "proxy, fast upstream")
            mps = _median([r.messages_per_s for r in results])
            per_core = _median([2 * r.messages_per_s / r.cpu_share for r in results
                                if r.cpu_share])
            vs = f"proxy CPU {_pct(_median_of(results, None))}"
            memory = vias.get((MEMORY, sm))
            paired = None
            if memory and variant != MEMORY:
                paired = [r.messages_per_s / m.messages_per_s
                          for r, m in zip(results, memory, strict=True)]
                vs += f"; {mps / _median([m.messages_per_s for m in memory]):.1%} of memory"
                if len(paired) > 1:
                    vs += f" (paired runs {min(paired):.0%}–{max(paired):.0%})"
            self.row("capacity", label, "messages/s", round(mps), vs=vs + _spread(results),
                     paired_ratio_memory=paired, runs=[round(r.messages_per_s) for r in results])
            self.row("capacity", label, "stanzas per CPU-second", round(per_core),
                     vs=f"{1e6 / per_core * 2:.1f} µs of proxy CPU per message")
            if variant[0] == "journal" and all(r.sampled for r in results):
                self._journal_row("capacity", label, results)
            details[label] = [r.as_dict() for r in results]
        self.details["capacity"]["durability"] = details

    def _profiler(self, proxy: procs.Child, tag: str) -> Callable[[float], object] | None:
        """With --profile: a callback that starts py-spy on ``proxy`` for the measured
        window; _finish_profile(tag) then summarizes the samples."""
        if not self.opts.profile:
            return None
        if not py_spy_available():
            self.progress("--profile: py-spy not found (pip install py-spy); not profiling")
            return None
        out = Path(self.opts.profile).resolve()
        out.mkdir(parents=True, exist_ok=True)
        raw = out / f"{tag}.collapsed.txt"

        def start(seconds: float) -> None:
            self.progress(f"py-spy recording {proxy.name} (pid {proxy.pid}) for {seconds:g} s")
            self._spies[tag] = (start_py_spy(proxy.pid, seconds, raw), raw)

        return start

    def _finish_profile(self, tag: str) -> None:
        entry = self._spies.pop(tag, None)
        if entry is None:
            return
        spy, raw = entry
        try:
            _, err = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        if spy.returncode != 0 or not raw.exists():
            self.progress(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
            return
        summary = format_hot_spots(raw)
        (raw.parent / f"{tag}.hotspots.md").write_text(summary + "\n")
        self.details.setdefault("profile", {})[tag] = {"collapsed": str(raw),
                                                       "summary": summary}
        self.progress(f"profile of {tag} written to {raw.parent}")

    async def case_workers(self) -> None:
        """``workers: N`` in front of the fast upstream: messages/s and stanzas per proxy
        CPU-second (the supervisor and every worker summed) for each count of
        ``--workers``, ``--repeat`` times interleaved. The accounts spread over the homes;
        which worker accepts a connection is the kernel's choice, so about 1 in N is
        accepted by its home and the rest are relayed by another worker."""
        from proxy.workers import home_of

        o = self.opts
        kw = dict(seconds=o.seconds, warmup=o.warmup, window=o.window, batch=o.batch,
                  progress=self.progress)
        accounts = balanced_accounts(2 * o.pairs, max(o.workers))
        upstream = await self.started(procs.fast_upstream(self.workdir / "workers"))
        runs: dict[int, list[load.ThroughputResult]] = {n: [] for n in o.workers}
        try:
            for run in range(o.repeat):
                for count in o.workers:
                    name = f"proxy-workers{count}-{run + 1}"
                    proxy = await self.started(self.proxy_before_fast(
                        name, upstream, workers=count, log_level="info"))
                    try:
                        # The supervisor says "listening" once every worker accepts.
                        ok = await asyncio.to_thread(
                            procs.wait_until, lambda p=proxy: p.events("listening"), 30)
                        if not ok:
                            raise RuntimeError(f"{name} did not start:\n{proxy.log_tail()}")
                        watch = {f"{name}-{pid}": pid for pid in procs.family(proxy.pid)}
                        ep = Endpoint(name, "127.0.0.1", proxy.port,
                                      watch={"supervisor": proxy.pid, **watch,
                                             upstream.name: upstream.pid})
                        runs[count].append(await load.throughput(ep, accounts, **kw))
                    finally:
                        await self.stopped(proxy)
        finally:
            await self.stopped(upstream)
        base: float | None = None
        details: dict[str, Any] = {}
        for count, results in runs.items():
            mps = _median([r.messages_per_s for r in results])
            cpu = _median([sum(v for k, v in r.cpu.items()
                               if k != "harness" and k != upstream.name) for r in results])
            per_cpu = 2 * mps / cpu if cpu else float("nan")
            base = mps if base is None else base
            homes = sorted(home_of(f"{u}@localhost", count) for u, _ in accounts)
            label = f"proxy, workers: {count}"
            self.row("workers", label, "messages/s", round(mps),
                     vs=f"{mps / base:.2f}x workers: {o.workers[0]}" + _spread(results))
            self.row("workers", label, "stanzas per proxy CPU-second", round(per_cpu),
                     vs=f"proxy CPU {cpu:.0%} (all its processes); upstream CPU "
                        f"{_median([r.cpu.get(upstream.name, 0) for r in results]):.0%}; "
                        f"harness {_median([r.cpu.get('harness', 0) for r in results]):.0%}")
            details[str(count)] = {"runs": [r.as_dict() for r in results],
                                   "messages_per_s": mps, "proxy_cpu": cpu,
                                   "stanzas_per_proxy_cpu_second": per_cpu,
                                   "accounts_per_home": {h: homes.count(h) for h in set(homes)}}
        self.details["workers"] = details

    async def case_rules(self) -> None:
        o = self.opts
        rules_file = write_fifty_rules(self.workdir / "rules50.yaml")
        if not _rules_wired(rules_file):
            self.row("rules", "proxy, 50 rules", "messages/s", "n/a", vs="rules not wired")
            self.details["rules"] = {"wired": False}
            return
        kw = dict(seconds=o.seconds, warmup=o.warmup, window=o.window, batch=o.batch,
                  progress=self.progress)
        accounts = self.fake_accounts(2 * o.pairs, "rules")
        upstream = await self.started(procs.fast_upstream(self.workdir / "rules"))
        try:
            proxy = await self.started(self.proxy_before_fast("proxy-norules", upstream))
            try:
                none = await load.throughput(self.ep("proxy, no rules", proxy.port,
                                                     watch=proxy), accounts, **kw)
            finally:
                await self.stopped(proxy)
            proxy = await self.started(self.proxy_before_fast(
                "proxy-rules50", upstream, rules=[str(rules_file)]))
            try:
                fifty = await load.throughput(self.ep("proxy, 50 rules", proxy.port,
                                                      watch=proxy), accounts,
                                              on_window=self._profiler(proxy, "rules50"), **kw)
                self._finish_profile("rules50")
            finally:
                await self.stopped(proxy)
        finally:
            await self.stopped(upstream)
        ratio = fifty.messages_per_s / none.messages_per_s
        self.row("rules", "proxy, no rules (fast upstream)", "messages/s",
                 round(none.messages_per_s), vs=f"proxy CPU {_pct(none.cpu_share)}")
        self.row("rules", "proxy, 50 rules (fast upstream)", "messages/s",
                 round(fifty.messages_per_s),
                 vs=f"{ratio:.1%} of no rules; proxy CPU {_pct(fifty.cpu_share)}", ratio=ratio)
        self.details["rules"] = {"wired": True, "none": none.as_dict(),
                                 "fifty": fifty.as_dict(), "ratio": ratio}

    async def case_resume(self) -> None:
        o = self.opts
        server = await self.prosody_server()
        (user, password), = (await self.prosody_accounts(max(2 * o.pairs, 1)))[:1]
        proxy = await self.started(self.proxy_before_prosody("proxy-resume"))
        times: list[float] = []
        client: BenchClient | None = None
        try:
            ep = self.ep("proxy", proxy.port)
            client = await _login(ep, user, password, "resume")
            sm_id = await client.enable_sm()
            self.progress(f"{o.resumes} resumptions via the proxy (Prosody {server.c2s_port})")
            for _ in range(o.resumes):
                client.abort()
                client = await BenchClient.connect(ep.host, ep.port)
                await client.authenticate(user, password)
                times.append(await client.resume(sm_id, 0) * 1000)
                client.write("<a xmlns='urn:xmpp:sm:3' h='0'/>")
        finally:
            if client is not None:
                await client.close()
            await self.stopped(proxy)
        p50, p99 = load.percentile(times, 50), load.percentile(times, 99)
        self.row("resume", "via proxy", "<resume/> to <resumed/> p50", round(p50, 3), "ms",
                 vs="direct: n/a (no SM)")
        self.row("resume", "via proxy", "<resume/> to <resumed/> p99", round(p99, 3), "ms",
                 vs=f"{len(times)} resumptions")
        self.details["resume"] = {"p50_ms": p50, "p99_ms": p99, "max_ms": max(times),
                                  "n": len(times)}

    async def case_memory(self) -> None:
        """Idle sessions through the proxy in front of the fast upstream, both legs TLS (and,
        at the smallest size, with a plain upstream leg for comparison)."""
        o = self.opts
        sizes = sorted(o.sessions)
        self.details["memory"] = {"baseline_sessions": WARM_SESSIONS, "runs": {}}
        for label, tls, counts in (("both TLS legs", True, sizes),
                                   ("client TLS leg only", False, sizes[:1])):
            await self._memory(label, tls, counts)
        self.details["memory"]["nofile_limit"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    async def _memory(self, label: str, tls: bool, sizes: list[int]) -> None:
        name = "memory-tls" if tls else "memory-plain"
        upstream = await self.started(procs.fast_upstream(
            self.workdir / name, cert=self.cert if tls else None, key=self.key if tls else None))
        trace = Path(self.opts.memtrace) / name if self.opts.memtrace else None
        workers = self.opts.memory_workers
        extra: dict[str, Any] = {"workers": workers, "log_level": "info"} if workers > 1 else {}
        proxy = await self.started(self.proxy_before_fast(f"proxy-{name}", upstream, tls=tls,
                                                          memtrace=trace, **extra))
        if workers > 1 and not await asyncio.to_thread(
                procs.wait_until, lambda: proxy.events("listening"), 30):
            raise RuntimeError(f"the proxy's workers did not start:\n{proxy.log_tail()}")
        family = [proxy.pid, *procs.family(proxy.pid)]  # the supervisor and its workers
        clients: list[BenchClient] = []
        run: dict[str, Any] = {}
        self.details["memory"]["runs"][label] = run
        try:
            ep = self.ep("proxy", proxy.port)
            accounts = self.fake_accounts(sizes[-1], "idle")
            clients += await load.login_many(ep, accounts[:WARM_SESSIONS], resource="idle")
            await asyncio.sleep(IDLE_WAIT)
            base = sum(procs.rss_bytes(pid) for pid in family)
            traced = (await asyncio.to_thread(proxy.memory_snapshot)
                      if trace is not None else None)
            run["baseline_rss"] = base
            self.progress(f"{label}: proxy RSS with {WARM_SESSIONS} sessions "
                          f"{base / 2**20:.1f} MiB")
            for n in sizes:
                more = accounts[len(clients):n]
                t = time.monotonic()
                new, errors = await load.login_some(ep, more, resource="idle", concurrency=64,
                                                    progress=self.progress)
                clients += new
                took = time.monotonic() - t
                await asyncio.sleep(IDLE_WAIT)
                rss = sum(procs.rss_bytes(pid) for pid in family)
                each = [len(os.listdir(f"/proc/{pid}/fd")) for pid in family]
                fds = max(each)  # the limit is per process
                have = len(clients)
                per = (rss - base) / (have - WARM_SESSIONS)
                if trace is not None and traced is not None:
                    await self._memory_breakdown(proxy, trace, traced, have - WARM_SESSIONS,
                                                 f"{label}, {n} sessions", run, str(n))
                echoed = await load.echo_check(clients)
                self.progress(f"{label}, {have}/{n} sessions: proxy RSS {rss / 2**20:.1f} MiB, "
                              f"{per / 1024:.1f} KiB per session, {fds} fds, "
                              f"{echoed}/{have} echoed; logins took {took:.1f} s")
                failed = ""
                if errors:
                    failed = f"; {len(errors)} logins FAILED ({_short_error(errors[0])})"
                    self.progress(f"{label}: {len(errors)} of {n} logins failed; first: "
                                  f"{errors[0]!r}")
                self.row("memory", f"{n} idle sessions, {label}", "RSS per session",
                         round(per / 1024, 1), "KiB",
                         vs=f"total {rss / 2**20:.0f} MiB; {echoed}/{n} working; "
                            f"{fds} fds{failed}"
                            + (f"; {workers} workers (fds {'/'.join(map(str, each[1:]))})"
                               if workers > 1 else ""))
                run[str(n)] = {"rss": rss, "per_session": per, "fds": fds, "echoed": echoed,
                               "fds_per_process": each, "workers": workers,
                               "sessions": have, "failed_logins": len(errors),
                               "first_error": repr(errors[0]) if errors else None,
                               "login_seconds": took}
                if errors:
                    break
        finally:
            load.abort_all(clients)
            await self.stopped(proxy)
            await self.stopped(upstream)
        if proxy.stop_seconds is not None:  # the clients are gone: what the stop settles
            run["stop"] = {"sessions": len(clients), "seconds": proxy.stop_seconds,
                           "cpu_seconds": proxy.stop_cpu, "killed": proxy.killed}
            self.row("memory", f"{len(clients)} idle sessions, {label}",
                     "graceful stop (SIGTERM to exit)", round(proxy.stop_seconds, 2), "s",
                     vs=(f"{proxy.stop_cpu:.2f} s of proxy CPU" if proxy.stop_cpu is not None
                         else "") + ("; KILLED at the harness's 8 s" if proxy.killed else ""))

    async def _memory_breakdown(self, proxy: procs.Proxy, folder: Path,
                                baseline: tuple[Path, dict[str, Any]], sessions: int,
                                label: str, run: dict[str, Any], key: str) -> None:
        """``--memtrace``: where the memory of the sessions added since the baseline went
        (tracemalloc by line, and the C allocator's bytes that are not Python's)."""
        snap, heap = await asyncio.to_thread(proxy.memory_snapshot)
        result = await asyncio.to_thread(memtrace.analyse, baseline[0], snap, baseline[1],
                                         heap, sessions, procs.REPO)
        text = memtrace.report(result)
        out = folder / f"breakdown-{key}.txt"
        out.write_text(f"{label}\n{text}")
        self.progress(f"{label}: breakdown in {out}\n{text}")
        run.setdefault("breakdown", {})[key] = result

    async def case_restore(self) -> None:
        o = self.opts
        n = o.restore_sessions
        server = await self.prosody_server()
        accounts = await self.prosody_accounts(n)
        proxy = await self.started(self.proxy_before_prosody(
            "proxy-restore", log_level="info",
            reconnect={"first_delay_max": o.first_delay_max, "base": 0.2, "cap": 2}))
        clients: list[BenchClient] = []
        try:
            ep = self.ep("proxy", proxy.port)
            clients = await load.login_many(ep, accounts, resource="restore", concurrency=32,
                                            progress=self.progress, every=250)
            self.progress(f"{n} sessions via the proxy; killing Prosody")
            await asyncio.to_thread(server.kill)
            killed = time.time()
            await asyncio.sleep(0.2)
            await asyncio.to_thread(server.start)
            restarted = time.time()
            self.progress(f"Prosody back after {restarted - killed:.2f} s; waiting for "
                          f"{n} upstream_restored")
            ok = await asyncio.to_thread(
                procs.wait_until, lambda: len(proxy.events("upstream_restored")) >= n,
                o.restore_timeout, 0.25)
            events = [json.loads(line) for line in proxy.events("upstream_restored")]
            stamps = sorted(dt.datetime.fromisoformat(e["timestamp"]).timestamp()
                            for e in events)
            alive = sum(not c.reader.at_eof() for c in clients)
            echoed = await load.echo_check(clients)
        finally:
            load.abort_all(clients)
            await self.stopped(proxy)
        if stamps:
            last = stamps[-1] - restarted
            median = stamps[len(stamps) // 2] - restarted
        else:
            last = median = float("nan")
        resumed = sum(bool(e.get("tls_resumed")) for e in events)
        self.row("restore", f"{n} sessions, server killed", "restart to all restored",
                 round(last, 2), "s",
                 vs=f"{len(events)}/{n} restored; half by {median:.2f} s; "
                    f"first_delay_max {o.first_delay_max:g}")
        self.row("restore", f"{n} sessions, server killed", "clients working after",
                 f"{echoed}/{n}", vs=f"{alive}/{n} connections kept")
        self.details["restore"] = {"sessions": n, "restored": len(events), "complete": ok,
                                   "seconds_to_all": last, "seconds_to_half": median,
                                   "outage_seconds": restarted - killed, "echoed": echoed,
                                   "connections_kept": alive, "tls_resumed": resumed}

    # -- the run ------------------------------------------------------------------------------

    async def run(self, cases: list[str]) -> None:
        table: dict[str, Callable[[], Awaitable[None]]] = {
            name: getattr(self, f"case_{name}") for name in CASES}
        for name in cases:
            self.progress(f"== {name}")
            started = time.monotonic()
            try:
                await table[name]()
            except Exception as exc:  # one broken case does not lose the others' figures
                self.progress(f"{name} FAILED: {exc!r}")
                self.row(name, "-", "FAILED", "error", vs=f"{type(exc).__name__}: {exc}"[:120])
                self.details.setdefault("errors", {})[name] = repr(exc)
            self.details.setdefault("case_seconds", {})[name] = round(
                time.monotonic() - started, 1)

    def close(self) -> None:
        procs.stop_all()
        if self.prosody is not None:
            self.prosody.stop()
        if not self.opts.workdir and not self.opts.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


async def _login(ep: Endpoint, user: str, password: str, resource: str) -> BenchClient:
    from .client import login
    return await login(ep.host, ep.port, user, password, resource=resource, domain=ep.domain,
                       direct_tls=ep.direct_tls)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: stop like Ctrl-C, children stopped on the way out


def _short_error(exc: BaseException) -> str:
    """A SASL or stream error condition if the message has one, else the exception, short."""
    text = str(exc)
    m = re.search(r"<([a-z-]+)/>\s*(?:<text[^>]*>[^<]*</text>\s*)?</(?:failure|stream:error)>",
                  text)
    return m.group(1) if m else f"{type(exc).__name__}: {text}"[:80]


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _median_of(results: list[load.ThroughputResult], process: str | None) -> float | None:
    """The median CPU share of ``process`` (None: the watched one) over the runs."""
    shares = [r.cpu_share if process is None else r.cpu.get(process) for r in results]
    known = [s for s in shares if s is not None]
    return _median(known) if known else None


def _cpu_per_message(results: list[load.ThroughputResult]) -> float:
    """The proxy's CPU time per message relayed, in µs (median over the runs): less
    sensitive than messages/s to what else the machine is doing."""
    return _median([r.cpu_share / r.messages_per_s * 1e6 for r in results
                    if r.cpu_share and r.messages_per_s])


def _range(values: list[float], digits: int = 0) -> str:
    """``; runs A–B`` for more than one run, else nothing."""
    if len(values) < 2:
        return ""
    lo, hi = min(values), max(values)
    if digits:
        return f"; runs {lo:.{digits}f}–{hi:.{digits}f}"
    return f"; runs {lo:,.0f}–{hi:,.0f}"


def _spread(results: list[load.ThroughputResult]) -> str:
    values = [r.messages_per_s for r in results]
    if len(values) < 2:
        return ""
    mid = _median(values)
    return f"{_range(values)} (±{(max(values) - min(values)) / 2 / mid:.1%})"


# A durability variant of the proxy: (mode, fsync); (None, None) is the proxy's own default.
Variant = tuple[str | None, str | None]
DEFAULT_VARIANT: Variant = (None, None)
MEMORY: Variant = ("memory", None)
FSYNC = ("normal", "full", "off")


def variant_tag(variant: Variant) -> str:
    mode, fsync = variant
    if mode is None:
        return "default"
    return mode if mode == "memory" or fsync in (None, "normal") else f"{mode}-{fsync}"


def proxy_label(variant: Variant, sm: bool) -> str:
    mode, fsync = variant
    label = "via proxy"
    if mode == "memory":
        label += ", memory"
    elif mode == "journal":
        label += ", journal" + ("" if fsync in (None, "normal") else f" fsync={fsync}")
    return label + (", SM" if sm else "")


def _durability(text: str) -> list[Variant]:
    """``journal,memory,journal:full``: durability modes, a journal's fsync after a colon."""
    out: list[Variant] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        mode, _, fsync = item.partition(":")
        if mode not in ("journal", "memory"):
            raise argparse.ArgumentTypeError(f"unknown durability mode {mode!r} (journal, "
                                             "memory; journal:full, journal:off)")
        if fsync and (mode != "journal" or fsync not in FSYNC):
            raise argparse.ArgumentTypeError(f"bad fsync in {item!r}: journal:normal, "
                                             "journal:full or journal:off")
        variant: Variant = (mode, (fsync or "normal") if mode == "journal" else None)
        if variant not in out:
            out.append(variant)
    if not out:
        raise argparse.ArgumentTypeError("no durability mode given")
    return out


def _sm(text: str) -> list[bool]:
    values = {"off": False, "on": True}
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or any(n not in values for n in names):
        raise argparse.ArgumentTypeError("--sm takes off, on or off,on")
    return list(dict.fromkeys(values[n] for n in names))


def _rules_wired(rules_file: Path) -> bool:
    """Whether the proxy's configuration takes ``rules: [paths]`` yet."""
    from proxy.config import ConfigError, parse_config
    try:
        parse_config({"rules": [str(rules_file)]})
    except ConfigError:
        return False
    return True


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE (inherited by the processes we start) to at least ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft, hard
    want_hard = max(hard, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, want_hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # not root: what we may
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def machine() -> dict[str, Any]:
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=procs.REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return {"nproc": os.cpu_count(), "mem_total_gib": round(int(mem) / 2**20, 1),
            "commit": commit,
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu": _cpu_model(),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("case", "setup", "figure", "value", "unit", "compared")
    cells = [head] + [(r["case"], r["setup"], r["figure"], _fmt(r["value"]), r["unit"],
                       r["vs"]) for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(head))]
    lines = []
    for k, c in enumerate(cells):
        lines.append("| " + " | ".join(
            str(v).rjust(widths[i]) if i == 3 and k else str(v).ljust(widths[i])
            for i, v in enumerate(c)) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def balanced_accounts(n: int, workers: int) -> list[tuple[str, str]]:
    """``n`` fast-upstream accounts, as many homed in each of ``workers`` as can be (the
    same set for every worker count of a run, so the figures compare)."""
    from proxy.workers import home_of

    want = {h: n // workers + (1 if h < n % workers else 0) for h in range(workers)}
    out: list[tuple[str, str]] = []
    k = 0
    while len(out) < n:
        name = f"fast{k}"
        home = home_of(f"{name}@localhost", workers)
        if want[home] > 0:
            want[home] -= 1
            out.append((name, "any"))
        k += 1
    return out


def _counts(text: str) -> list[int]:
    counts = [int(s) for s in text.split(",") if s.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("worker counts are 1 or more")
    return counts


def _sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or min(sizes) <= WARM_SESSIONS:
        raise argparse.ArgumentTypeError(f"sizes must be more than {WARM_SESSIONS}")
    return sizes


def _cases(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown case {unknown[0]!r} (known: "
                                         f"{', '.join(CASES)})")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="xmpp-front benchmarks: each figure through the proxy and directly, "
                    "in the same run. Cases: " + ", ".join(CASES))
    p.add_argument("--only", "--cases", dest="only", type=_cases, default=list(CASES),
                   help="comma-separated cases to run (default: all)")
    p.add_argument("--durability", type=_durability, metavar="MODE,...", default=None,
                   help="throughput and latency through a proxy with each durability mode "
                        "in the same run: journal, memory, journal:full, journal:off "
                        "(default: the proxy's own default only)")
    p.add_argument("--sm", type=_sm, default=[False], metavar="off|on|off,on",
                   help="throughput and latency clients via the proxy enable stream "
                        "management (Prosody has none, so direct clients never do) (off)")
    p.add_argument("--repeat", type=int, default=1,
                   help="throughput and latency: measure every setup N times, interleaved; "
                        "medians, with the range of the runs (1)")
    p.add_argument("--pairs", type=int, default=4, help="client pairs for throughput (4)")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="measured seconds per throughput/latency/login figure (5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (1)")
    p.add_argument("--window", type=int, default=2000,
                   help="undelivered messages allowed per pair (2000)")
    p.add_argument("--batch", type=int, default=25, help="messages per write (25)")
    p.add_argument("--rate", type=float, default=200.0,
                   help="messages/s in total for the latency figure (200)")
    p.add_argument("--loggers", type=int, default=4, help="concurrent loggers (4)")
    p.add_argument("--sessions", type=_sizes, default=[1000],
                   help="idle session counts for memory, e.g. 1000,10000 (1000)")
    p.add_argument("--resumes", type=int, default=50, help="resumptions measured (50)")
    p.add_argument("--restore-sessions", type=int, default=1000,
                   help="sessions restored after a server restart (1000)")
    p.add_argument("--first-delay-max", type=float, default=2.0,
                   help="reconnect.first_delay_max for the restore case (2)")
    p.add_argument("--restore-timeout", type=float, default=180.0,
                   help="seconds to wait for every session to be restored (180)")
    p.add_argument("--profile", metavar="DIR",
                   help="py-spy the proxy during the capacity case (and the first run of "
                        "each --durability variant); samples and hot spots go to DIR")
    p.add_argument("--memtrace", metavar="DIR",
                   help="memory: run the proxy under tracemalloc (bench/memtrace.py) and write "
                        "where each idle session's memory goes to DIR; its RSS figures then "
                        "include tracemalloc's own cost")
    p.add_argument("--json", metavar="PATH", help="write all results as JSON")
    p.add_argument("--workdir", metavar="DIR", help="keep configs and logs here")
    p.add_argument("--barrier-every", type=int, metavar="N", default=None,
                   help="upstream.barrier_every for proxies in front of Prosody "
                        "(default: the proxy's own default, 10)")
    p.add_argument("--features", choices=("default", "off"), default="default",
                   help="off: every emulated IM and mobile feature off in the proxies "
                        "(carbons, archive, blocking, push), for the relay's own cost")
    p.add_argument("--off", action="append", choices=FEATURES, default=[], metavar="FEATURE",
                   help="turn this feature off in the proxies (repeatable; e.g. --off archive: "
                        "what the emulated archive costs)")
    p.add_argument("--workers", type=_counts, default=[1, 2], metavar="N,...",
                   help="the workers case: proxies with each of these worker counts (1,2)")
    p.add_argument("--memory-workers", type=int, default=1, metavar="N",
                   help="the memory case through a proxy with workers: N (1); RSS summed "
                        "over its processes, descriptors counted per process")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    opts = p.parse_args(argv)
    for name in ("pairs", "loggers", "resumes", "restore_sessions", "window", "batch",
                 "repeat"):
        if getattr(opts, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if opts.batch >= opts.window:
        p.error("--batch must be smaller than --window")
    if opts.seconds <= 0 or opts.rate <= 0:
        p.error("--seconds and --rate must be positive")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    cases = [c for c in CASES if c in opts.only]
    biggest = max([*(opts.sessions if "memory" in cases else [0]),
                   opts.restore_sessions if "restore" in cases else 0])
    # Per session: the harness's client socket; the proxy's client and upstream sockets; the
    # upstream's socket. One limit for all (children inherit it), with room to spare.
    # The proxy needs two descriptors per session (client and upstream sockets) and a few
    # of its own; the harness one per session; the fast upstream one per session.
    proxy_needs = 2 * biggest + PROXY_OWN_FDS
    nofile = raise_nofile(2 * biggest + 4096)
    bench = Bench(opts)
    bench.progress(f"work folder {bench.workdir}; RLIMIT_NOFILE {nofile[0]} (hard "
                   f"{nofile[1]}); the proxy needs about {proxy_needs} for {biggest} sessions")
    if nofile[0] < proxy_needs:
        bench.progress(f"warning: RLIMIT_NOFILE {nofile[0]} < {proxy_needs}: the proxy can "
                       f"hold about {(nofile[0] - PROXY_OWN_FDS) // 2} sessions here (raising "
                       "the hard limit needs root with CAP_SYS_RESOURCE)")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        asyncio.run(bench.run(cases))
    except KeyboardInterrupt:
        bench.progress("interrupted")
        return 130
    finally:
        bench.close()
    m = machine()
    out = {"machine": m, "command": "python -m bench " + " ".join(
        argv if argv is not None else sys.argv[1:]), "options": vars(opts),
        "nofile": nofile, "rows": bench.rows, "details": bench.details}
    print(format_table(bench.rows))
    print(f"\n{m['date']}; commit {m['commit']}; {m['nproc']} CPUs ({m['cpu']}); "
          f"{m['mem_total_gib']} GiB; Python {m['python']}; "
          f"total {time.monotonic() - bench.t0:.0f} s")
    if opts.json:
        Path(opts.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        bench.progress(f"results written to {opts.json}")
    return 1 if "errors" in bench.details else 0


if __name__ == "__main__":
    sys.exit(main())
