"""bench/run: measure xks-proxy's throughput, latency, ceilings and memory in one command.

Phases (``--phases``, in this order):

  pkcs11  single-thread AES-GCM encrypt ops/s on the bench's token: bare python-pkcs11
          and the proxy's Pkcs11KeyManager (the HSM ceiling)
  echo    a bare uvicorn+httptools+uvloop app answering fixed JSON, same workers and
          same wrk settings (the HTTP ceiling), alternated run by run with the proxy
          doing Encrypt: the ratio comes from back-to-back pairs
  floor   the architecture's floor: the same bare app plus one real HSM encrypt per
          request through the proxy's adapter, on an HSM thread (as the proxy must)
          and, for comparison, on the event loop; alternated with the proxy (Encrypt);
          then the open-loop rate on the floor (HSM thread) and on the proxy in turn
  closed  closed-loop HTTP keep-alive with wrk, one measurement per workload in --mix
  open    open-loop at --rate for --open-duration, latency from the scheduled time
  https   closed-loop over TLS 1.3 keep-alive with wrk, alternated with an HTTP proxy
          (ratio from back-to-back pairs)
  memory  worker RSS after --memory-first and after --memory-requests requests (--memory)

Each closed-loop measurement is the median of --repeat runs of --duration seconds.
Before each run the bench waits (up to --wait-quiet s) for other processes to go
quiet, and it reports the CPU every server process, wrk and everything else used.

Every request is a real XKS request signed by botocore's SigV4 signer. Pools of
distinct requests are signed right before each phase and replayed: signatures are
valid for 5 minutes, so every phase is kept under 4 minutes (memory runs re-sign per
chunk). Results: a table on stdout, bench/results/<timestamp>.json and .png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PHASES = ("pkcs11", "echo", "floor", "closed", "open", "https", "memory")
DEFAULT_PHASES = "pkcs11,echo,floor,closed,open,https"
RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--phases", default=DEFAULT_PHASES, help=f"comma list of {','.join(PHASES)} (%(default)s)")
    add("--memory", action="store_true", help="also run the memory phase")
    add("--quick", action="store_true", help="short everything: a smoke run in under a minute")
    add("--workers", type=int, default=2, help="proxy (and echo) worker processes (%(default)s)")
    add("--duration", type=int, help="closed-loop seconds per run: echo, closed, https (10)")
    add("--threads", type=int, default=1, help="wrk threads (%(default)s)")
    add("--connections", type=int, default=32, help="wrk connections (%(default)s)")
    add(
        "--mix",
        default="encrypt,decrypt,metadata,health,mix",
        help="closed-loop workloads, comma list of encrypt,decrypt,metadata,health,mix "
        "(%(default)s)",
    )
    add(
        "--mix-weights",
        default="encrypt=45,decrypt=45,metadata=5,health=5",
        help="what the 'mix' workload sends, in percent (%(default)s)",
    )
    add("--rate", type=float, default=1800.0, help="open-loop requests/s (%(default)g)")
    add("--open-duration", type=float, help="open-loop measured seconds (20)")
    add("--open-warmup", type=float, help="open-loop seconds at rate before measuring (2)")
    add("--open-connections", type=int, default=64, help="pre-opened (%(default)s)")
    add("--open-workload", default="encrypt", help="open-loop workload (%(default)s)")
    add("--https-workload", default="encrypt", help="HTTPS workload (%(default)s)")
    add("--warmup", type=int, help="wrk warm-up seconds on each fresh server (2)")
    add(
        "--repeat",
        type=int,
        help="run each closed-loop measurement (echo, closed, https) this many times and "
        "report the median run; all runs are kept in the JSON file (3, --quick 1)",
    )
    add("--pool", type=int, help="distinct pre-signed requests per phase (1000)")
    add("--memory-requests", type=int, help="memory: requests in total (1000000)")
    add("--memory-first", type=int, default=10_000, help="memory: first RSS sample (%(default)s)")
    add("--memory-workload", default="mix", help="memory workload (%(default)s)")
    add("--memory-pool", type=int, help="memory: distinct requests per chunk (20000)")
    add("--pkcs11-seconds", type=float, help="seconds per PKCS#11 ceiling (3)")
    add(
        "--wait-quiet",
        type=float,
        help="before each measurement wait up to this many seconds for other processes to "
        "use less than --quiet-cores (shared machines; 30, --quick 0)",
    )
    add("--quiet-cores", type=float, default=0.25, help="see --wait-quiet (%(default)g)")
    add("--log-level", default="info", help="proxy log level; info logs every request")
    add(
        "--no-health-port",
        action="store_true",
        help="leave server.health_port unset (this also turns the per-request Prometheus "
        "metrics off): to measure what they cost",
    )
    add(
        "--no-audit",
        action="store_true",
        help="switch the proxy's audit log off ([audit] enabled = false): to measure what it costs",
    )
    add(
        "--audit-fsync",
        action="store_true",
        help="[audit] fsync = true: each record synced to disk before its answer",
    )
    add("--seed", type=int, default=1)
    add("--output-dir", type=Path, default=RESULTS_DIR)
    add("--keep", action="store_true", help="keep the temporary directory (token, logs)")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults --quick shortens and check the flags."""
    quick = args.quick
    defaults = {
        "duration": (2, 10),
        "open_duration": (3.0, 20.0),
        "open_warmup": (0.5, 2.0),
        "warmup": (1, 2),
        "pool": (300, 1000),
        "memory_requests": (20_000, 1_000_000),
        "memory_pool": (2000, 20_000),
        "pkcs11_seconds": (0.5, 3.0),
        "wait_quiet": (0.0, 30.0),
        "repeat": (1, 3),
    }
    for name, (short, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"bench/run: unknown phase(s): {', '.join(sorted(unknown))}")
    if args.no_audit and args.audit_fsync:
        raise SystemExit("bench/run: --no-audit and --audit-fsync exclude each other")
    if args.memory and "memory" not in phases:
        phases.append("memory")
    args.phase_list = [p for p in PHASES if p in phases]

    from .workloads import PHASE_LIMIT_SECONDS, WORKLOADS, parse_mix

    args.weights = parse_mix(args.mix_weights)
    args.workloads = [w.strip() for w in args.mix.split(",") if w.strip()]
    for workload in [
        *args.workloads,
        args.open_workload,
        args.https_workload,
        args.memory_workload,
    ]:
        if workload not in WORKLOADS:
            raise SystemExit(f"bench/run: unknown workload {workload!r} ({', '.join(WORKLOADS)})")
    per_run = args.duration + args.wait_quiet + 2
    if args.repeat < 1 or args.repeat * per_run + args.warmup + 20 > PHASE_LIMIT_SECONDS:
        raise SystemExit(
            "bench/run: --repeat x (--duration + --wait-quiet) too long: pre-signed requests "
            "expire after 5 min"
        )
    if args.duration + args.warmup + 20 > PHASE_LIMIT_SECONDS:
        raise SystemExit("bench/run: --duration too long: pre-signed requests expire after 5 min")
    if args.open_duration + args.open_warmup + 20 > PHASE_LIMIT_SECONDS:
        raise SystemExit("bench/run: --open-duration too long (pre-signed requests)")
    if args.workers < 1 or args.threads < 1 or args.connections < args.threads:
        raise SystemExit("bench/run: need workers >= 1, threads >= 1, connections >= threads")
    if args.wait_quiet > 60:
        raise SystemExit("bench/run: --wait-quiet at most 60 s (pre-signed requests expire)")
    if args.memory_requests <= args.memory_first:
        raise SystemExit("bench/run: --memory-requests must exceed --memory-first")
    return args


def say(text: str) -> None:
    print(text, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, results: dict[str, Any]) -> None:
        from .environment import BenchToken

        self.args = args
        self.work = work
        self.results = results
        self.phases: dict[str, Any] = results["phases"]
        self.token: BenchToken | None = None
        self.ciphertexts: list[Any] = []
        self.seed = args.seed * 1_000_003
        self.longest_signed_window = 0.0

    # ---------------------------------------------------------------- helpers

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed

    def wrk_settings(self, duration: int | None = None) -> Any:
        from .wrk import WrkSettings

        return WrkSettings(self.args.threads, self.args.connections, duration or self.args.duration)

    def signed_pool(self, target: Any, workload: str, size: int) -> tuple[list[Any], float]:
        """Sign a fresh pool for one phase; returns it and the moment it was signed."""
        from .workloads import build_pool, check_pool, workload_weights

        weights = workload_weights(workload, self.args.weights)
        if "decrypt" in weights and not self.ciphertexts:
            raise RuntimeError("no ciphertexts for decrypt requests")
        started = time.monotonic()
        pool = build_pool(target, weights, size, self.ciphertexts, self.next_seed())
        check_pool(target, pool)
        say(f"  signed {len(pool)} {workload} requests in {time.monotonic() - started:.1f} s")
        return pool, started

    def wait_for_quiet(self) -> dict[str, Any]:
        """Wait (up to --wait-quiet s) until the machine's other load is below --quiet-cores.

        Called right before a measurement, when the bench's own servers are idle, so
        whatever keeps the CPUs busy is someone else's.
        """
        from .environment import system_cpu

        limit = self.args.wait_quiet
        if limit <= 0:
            return {}
        started = time.monotonic()
        told = False
        while True:
            before = system_cpu()
            time.sleep(1.0)
            after = system_cpu()
            busy = (after["busy"] - before["busy"]) / (after["at"] - before["at"])
            waited = time.monotonic() - started
            if busy <= self.args.quiet_cores:
                return {"quiet_wait_s": round(waited, 1), "busy_cores_before": round(busy, 2)}
            if waited >= limit:
                say(f"  machine still busy ({busy:.2f} cores) after {waited:.0f} s; measuring")
                return {"quiet_wait_s": round(waited, 1), "busy_cores_before": round(busy, 2)}
            if not told:
                say(f"  waiting for other processes to calm down ({busy:.2f} cores busy)")
                told = True

    def note_window(self, signed_at: float) -> None:
        from .workloads import PHASE_LIMIT_SECONDS

        window = time.monotonic() - signed_at
        self.longest_signed_window = max(self.longest_signed_window, window)
        if window > PHASE_LIMIT_SECONDS:
            say(f"  WARNING: a phase ran {window:.0f} s after signing (limit 240 s)")

    def pool_files(self, pool: Sequence[Any], name: str) -> tuple[Path, Path]:
        from .wrk import write_pool

        lua = write_pool(self.work / f"{name}.pool", pool)
        js = self.work / f"{name}.json"
        js.write_text(json.dumps([request.as_json() for request in pool]), encoding="utf-8")
        return lua, js

    def closed_run(self, server: Any, target: Any, pool_file: Path, label: str) -> dict[str, Any]:
        """--repeat wrk runs; the median one (by req/s), with every run's numbers attached."""
        runs = [
            self.closed_once(server, target, pool_file, self.run_label(label, i))
            for i in range(self.args.repeat)
        ]
        return self.median_run(runs, label)

    def run_label(self, label: str, index: int) -> str:
        return f"{label} ({index + 1}/{self.args.repeat})" if self.args.repeat > 1 else label

    def median_run(self, runs: list[dict[str, Any]], label: str) -> dict[str, Any]:
        if len(runs) == 1:
            return runs[0]
        ordered = sorted(runs, key=lambda run: run["requests_per_s"])
        median = dict(ordered[len(ordered) // 2])
        per_cpu = sorted(run["requests_per_proxy_cpu_s"] or 0 for run in runs)
        median["requests_per_proxy_cpu_s"] = per_cpu[len(per_cpu) // 2]
        median["runs"] = [
            {
                "requests_per_s": run["requests_per_s"],
                "requests_per_proxy_cpu_s": run["requests_per_proxy_cpu_s"],
                "p99_ms": run["latency_ms"]["p99"],
                "other_processes_cores": run.get("other_processes_cores"),
            }
            for run in runs
        ]
        each = ", ".join(f"{run['requests_per_s']:,.0f}" for run in runs)
        say(
            f"    {label}: median of {len(runs)}: {median['requests_per_s']:,.0f} req/s "
            f"(runs {each}), {median['requests_per_proxy_cpu_s']:,.0f} per server CPU-second"
        )
        return median

    def paired_runs(
        self, first: tuple[Any, Any, str], second: tuple[Any, Any, str], workload: str
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Alternate closed-loop runs on two servers (A, B, A, B, ...), --repeat pairs.

        Both servers are up the whole time; each pair is signed just before it runs.
        Back-to-back runs see nearly the same machine, so their ratio is steadier than
        one of runs made minutes apart. Returns (median A, median B, ratio of B to A).
        """
        runs = self.alternated_runs([first, second], workload)
        return (
            self.median_run(runs[0], first[2]),
            self.median_run(runs[1], second[2]),
            pair_ratio(runs[0], runs[1]),
        )

    def alternated_runs(
        self, sides: Sequence[tuple[Any, Any, str]], workload: str
    ) -> list[list[dict[str, Any]]]:
        """--repeat rounds of one closed-loop run per server, in turn (A, B, C, A, ...)."""
        runs: list[list[dict[str, Any]]] = [[] for _ in sides]
        for index in range(self.args.repeat):
            for side, (server, target, label) in enumerate(sides):
                pool, signed_at = self.signed_pool(target, workload, self.args.pool)
                lua, _ = self.pool_files(pool, f"pair-{side}")
                if index == 0:
                    self.warm(server, target, lua)
                runs[side].append(
                    self.closed_once(server, target, lua, self.run_label(label, index))
                )
                self.note_window(signed_at)
        return runs

    def closed_once(
        self, server: Any, target: Any, pool_file: Path, label: str, duration: int | None = None
    ) -> dict[str, Any]:
        """One wrk run with CPU accounting of the server's processes."""
        from .environment import connections_by_pid, loadavg, machine_share, system_cpu
        from .wrk import run_wrk

        settings = self.wrk_settings(duration)
        quiet = self.wait_for_quiet()
        before = server.cpu_seconds()
        machine_before = system_cpu()

        spread: dict[str, int] = {}

        def progress(elapsed: float) -> None:
            now = server.cpu_seconds()
            used = sum(now.get(pid, 0.0) - before.get(pid, 0.0) for pid in now)
            if not spread:  # which worker holds wrk's keep-alive connections
                counts = connections_by_pid(server.worker_pids(), target.port)
                spread.update({f"worker {pid}": n for pid, n in counts.items()})
            say(
                f"    {label}: {elapsed:4.0f}/{settings.duration} s, "
                f"server CPU {used / elapsed:.2f} cores, connections per worker "
                + "/".join(str(n) for n in spread.values())
            )

        load = loadavg()
        result = run_wrk(f"{target.base_url}/", pool_file, settings, progress=progress)
        after = server.cpu_seconds()
        machine_after = system_cpu()
        used = sum(after.get(pid, 0.0) - before.get(pid, 0.0) for pid in after)
        data = result.as_json()
        data.update(
            machine_share(machine_before, machine_after, used + result.load_generator_cpu_s)
        )
        data["wrk"] = settings.as_json()
        data["server_cpu_s"] = round(used, 2)
        data["cpu_cores_by_process"] = {
            ("supervisor" if pid == server.pid else f"worker {pid}"): round(
                (after[pid] - before.get(pid, 0.0)) / result.duration_s, 2
            )
            for pid in after
        }
        data["connections_by_process"] = spread
        data["proxy_cpu_cores"] = round(used / result.duration_s, 2)
        data["load_generator_cores"] = round(result.load_generator_cpu_s / result.duration_s, 2)
        data["requests_per_proxy_cpu_s"] = round(result.requests / used, 0) if used else None
        data["loadavg_before"] = load
        data.update(quiet)
        say(
            f"    {label}: {result.rps:,.0f} req/s, non-2xx {result.non_2xx}, "
            f"socket errors {result.socket_error_total}, p50 {result.latency_ms['p50']:.2f} ms, "
            f"p99 {result.latency_ms['p99']:.2f} ms; CPU cores "
            + ", ".join(f"{k} {v:.2f}" for k, v in data["cpu_cores_by_process"].items())
            + f", wrk {data['load_generator_cores']:.2f}, "
            f"others {data.get('other_processes_cores', 0):.2f}"
        )
        return data

    def warm(self, server: Any, target: Any, pool_file: Path) -> None:
        from .wrk import run_wrk

        if self.args.warmup > 0:
            run_wrk(f"{target.base_url}/", pool_file, self.wrk_settings(self.args.warmup))

    # ---------------------------------------------------------------- servers

    @contextmanager
    def proxy(self, *, tls: bool, name: str) -> Iterator[tuple[Any, Any]]:
        """A fresh proxy (HTTP or HTTPS) on free ports; yields (server, target)."""
        import ssl

        from .environment import (
            URI_PREFIX,
            ProxyServer,
            free_port,
            make_tls,
            write_proxy_config,
        )
        from .workloads import Target

        assert self.token is not None
        port, health_port = free_port(), free_port()
        certs = make_tls(self.work / "pki") if tls else None
        config = write_proxy_config(
            self.work / f"{name}.toml",
            self.token,
            port=port,
            health_port=None if self.args.no_health_port else health_port,
            workers=self.args.workers,
            tls=certs,
            log_level=self.args.log_level,
            audit="off" if self.args.no_audit else "fsync" if self.args.audit_fsync else "on",
        )
        server = ProxyServer(
            config, self.work / f"{name}.log", port, self.args.workers, self.args.log_level
        )
        context = ssl.create_default_context(cafile=str(certs.ca_file)) if certs else None
        started = time.monotonic()
        server.start(ssl_context=context)
        say(
            f"  {name}: xks-proxy on {'https' if tls else 'http'}://127.0.0.1:{port} with "
            f"workers {server.worker_pids()} (ready in {time.monotonic() - started:.1f} s)"
        )
        target = Target(
            "https" if tls else "http",
            "127.0.0.1",
            port,
            URI_PREFIX,
            self.token.access_key_id,
            self.token.secret_access_key,
            str(certs.ca_file) if certs else None,
        )
        try:
            if not self.ciphertexts:
                from .workloads import pre_encrypt

                count = 64 if self.args.quick else 256
                self.ciphertexts = pre_encrypt(target, count, self.next_seed())
                say(f"  pre-encrypted {count} data keys for the decrypt pools")
            yield server, target
        finally:
            code = server.stop()
            if code not in (0, None):
                say(f"  note: {name} exited with {code}; log tail:\n{server.log_tail(10)}")

    # ---------------------------------------------------------------- phases

    def run(self) -> None:
        from .environment import BenchToken

        say(f"== setup: SoftHSM token and credentials in {self.work}")
        self.token = BenchToken.provision(self.work / "token")
        for phase in self.args.phase_list:
            started = time.monotonic()
            getattr(self, f"phase_{phase}")()
            say(f"  ({phase} took {time.monotonic() - started:.0f} s)")

    def phase_pkcs11(self) -> None:
        from .environment import python_env

        assert self.token is not None
        say("== pkcs11: single-thread AES-256-GCM encrypt ceiling (32 B + 40 B AAD)")
        out: dict[str, Any] = {}
        for mode in ("bare", "manager"):
            quiet = self.wait_for_quiet()
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "xksbench.hsm",
                    "--mode",
                    mode,
                    "--module",
                    self.token.module_path,
                    "--token-label",
                    "xks-bench",
                    "--pin-file",
                    str(self.token.pin_file),
                    "--conf",
                    str(self.token.conf_path),
                    "--seconds",
                    str(self.args.pkcs11_seconds),
                ],
                capture_output=True,
                text=True,
                env=python_env(),
                timeout=120,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"pkcs11 {mode} failed: {done.stderr.strip()[-2000:]}")
            out[mode] = {**json.loads(done.stdout.strip().splitlines()[-1]), **quiet}
            say(
                f"    {mode}: {out[mode]['ops_per_s']:,.0f} ops/s "
                f"({out[mode]['us_per_op']:.1f} us/op)"
            )
        self.phases["pkcs11"] = out

    def bare_target(self, port: int) -> Any:
        """A plain-HTTP target for the bench's own servers (they ignore the path)."""
        from .workloads import Target

        assert self.token is not None
        return Target(
            "http",
            "127.0.0.1",
            port,
            "bench",
            self.token.access_key_id,
            self.token.secret_access_key,
        )

    def phase_echo(self) -> None:
        from .environment import EchoServer, free_port

        assert self.token is not None
        say(
            f"== echo: bare uvicorn ceiling, {self.args.workers} workers, same POSTs; "
            "alternated with the proxy (Encrypt)"
        )
        port = free_port()
        echo = EchoServer(self.work / "echo.log", port, self.args.workers)
        echo.start()
        try:
            echo_target = self.bare_target(port)
            with self.proxy(tls=False, name="proxy-echo-pair") as (server, target):
                echo_data, proxy_data, ratio = self.paired_runs(
                    (echo, echo_target, "echo"), (server, target, "proxy encrypt"), "encrypt"
                )
            echo_data["paired_proxy_encrypt"] = proxy_data
            echo_data["paired_ratio_proxy_to_echo"] = ratio
            self.phases["echo"] = echo_data
        finally:
            echo.stop()

    def phase_floor(self) -> None:
        from .environment import FloorServer, free_port

        assert self.token is not None
        say(
            f"== floor: bare HTTP + one HSM encrypt per request, {self.args.workers} workers; "
            "HSM thread, event loop and the proxy (Encrypt) in turn"
        )
        servers: list[Any] = []
        sides: list[tuple[Any, Any, str]] = []
        try:
            for hsm_calls in ("thread", "inline"):
                port = free_port()
                floor = FloorServer(
                    self.work / f"floor-{hsm_calls}.log",
                    port,
                    self.args.workers,
                    self.token,
                    hsm_calls,
                )
                servers.append(floor)
                floor.start()
                sides.append((floor, self.bare_target(port), f"floor ({hsm_calls})"))
            with self.proxy(tls=False, name="proxy-floor-trio") as (server, target):
                sides.append((server, target, "proxy encrypt"))
                runs = self.alternated_runs(sides, "encrypt")
                # Latency at the open-loop rate, floor then proxy back to back.
                floor_open = self.open_once(sides[0][0], sides[0][1], "floor (thread) open")
                proxy_open = self.open_once(server, target, "proxy open")
            out: dict[str, Any] = {
                name: self.median_run(side_runs, label)
                for name, side_runs, (_, _, label) in zip(
                    ("thread", "inline", "proxy_encrypt"), runs, sides, strict=True
                )
            }
            out["open_thread"] = floor_open
            out["open_proxy"] = proxy_open
            out["ratio_proxy_to_thread"] = pair_ratio(runs[0], runs[2])
            out["ratio_inline_to_thread"] = pair_ratio(runs[0], runs[1])
            self.phases["floor"] = out
        finally:
            for floor in servers:
                floor.stop()

    def phase_closed(self) -> None:
        say(f"== closed: wrk -t{self.args.threads} -c{self.args.connections} HTTP keep-alive")
        out: dict[str, Any] = {}
        with self.proxy(tls=False, name="proxy-http") as (server, target):
            for index, workload in enumerate(self.args.workloads):
                pool, signed_at = self.signed_pool(target, workload, self.args.pool)
                lua, _ = self.pool_files(pool, f"closed-{workload}")
                if index == 0:
                    self.warm(server, target, lua)
                out[workload] = self.closed_run(server, target, lua, f"closed {workload}")
                out[workload]["pool"] = len(pool)
                self.note_window(signed_at)
                server.truncate_log()
        self.phases["closed"] = out

    def phase_open(self) -> None:
        args = self.args
        say(
            f"== open: {args.rate:g} req/s for {args.open_duration:g} s "
            f"(+{args.open_warmup:g} s warm-up), {args.open_workload}, latency from schedule"
        )
        with self.proxy(tls=False, name="proxy-open") as (server, target):
            self.phases["open"] = self.open_once(server, target, "open")

    def open_once(self, server: Any, target: Any, label: str) -> dict[str, Any]:
        """One open-loop run at --rate on a running server, with CPU accounting."""
        from .environment import loadavg, machine_share, system_cpu
        from .wrk import children_cpu

        args = self.args
        size = max(args.pool, 1)
        pool, signed_at = self.signed_pool(target, args.open_workload, size)
        _, pool_json = self.pool_files(pool, "open")
        lua, _ = self.pool_files(pool, "open-warm")
        self.warm(server, target, lua)
        quiet = self.wait_for_quiet()
        before = server.cpu_seconds()
        machine_before = system_cpu()
        children_before = children_cpu()
        load = loadavg()
        done = run_open_loop(
            pool_json,
            target.port,
            rate=args.rate,
            duration=args.open_duration,
            warmup=args.open_warmup,
            connections=args.open_connections,
            progress_every=2 if args.quick else 5,
        )
        after = server.cpu_seconds()
        machine_after = system_cpu()
        generator_cpu = children_cpu() - children_before
        self.note_window(signed_at)
        if done.returncode != 0:
            raise RuntimeError("open-loop generator failed (see its output above)")
        data: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        used = sum(after.get(pid, 0.0) - before.get(pid, 0.0) for pid in after)
        data["workload"] = args.open_workload
        data["server_cpu_s"] = round(used, 2)
        elapsed = args.open_duration + args.open_warmup
        data["proxy_cpu_cores"] = round(used / elapsed, 2)
        data["cpu_cores_by_process"] = {
            ("supervisor" if pid == server.pid else f"worker {pid}"): round(
                (after[pid] - before.get(pid, 0.0)) / elapsed, 2
            )
            for pid in after
        }
        data["load_generator_cores"] = round(generator_cpu / elapsed, 2)
        data.update(machine_share(machine_before, machine_after, used + generator_cpu))
        data["loadavg_before"] = load
        data.update(quiet)
        data["pool"] = len(pool)
        latency = data["latency_ms"]
        say(
            f"    {label}: {data['achieved_rate']:,.0f}/s achieved, errors {data['errors']}, "
            f"p50 {latency.get('p50', math.nan):.2f} ms, p99 {latency.get('p99', math.nan):.2f}"
            f" ms, p99.9 {latency.get('p99.9', math.nan):.2f} ms, "
            f"max {latency.get('max', math.nan):.2f} ms; generator send lag p99 "
            f"{data['send_lag_ms'].get('p99', math.nan):.2f} ms"
        )
        return data

    def phase_https(self) -> None:
        args = self.args
        say(
            f"== https: wrk -t{args.threads} -c{args.connections} over TLS keep-alive, "
            "alternated with an HTTP proxy"
        )
        with (
            self.proxy(tls=False, name="proxy-https-pair") as (plain, plain_target),
            self.proxy(tls=True, name="proxy-https") as (server, target),
        ):
            protocol = tls_probe(target)
            say(f"  negotiated {protocol}")
            http_data, data, ratio = self.paired_runs(
                (plain, plain_target, f"http {args.https_workload}"),
                (server, target, f"https {args.https_workload}"),
                args.https_workload,
            )
            data["workload"] = args.https_workload
            data["tls"] = protocol
            data["pool"] = args.pool
            data["paired_http"] = http_data
            data["paired_ratio_https_to_http"] = ratio
            self.phases["https"] = data

    def phase_memory(self) -> None:
        """RSS of every worker at the end of the first goal and of the last one.

        Chunks are time-bounded wrk runs (each re-signs its pool, so none outlives the
        signatures) with a request limit so the goal is not overshot; wrk abandons
        up to --connections requests in flight when it stops, so the limit adds them and
        a goal counts as reached within twice that.
        """
        from .environment import rss_kib
        from .workloads import PHASE_LIMIT_SECONDS

        args = self.args
        say(
            f"== memory: worker RSS after {args.memory_first:,} and {args.memory_requests:,} "
            f"requests ({args.memory_workload}), fresh proxy"
        )
        started = time.monotonic()
        state: dict[str, Any] = {"served": 0, "first_served": None, "workers": []}
        samples: dict[int, list[tuple[int, int]]] = {}
        marks: dict[int, dict[str, int]] = {}
        try:
            with self.proxy(tls=False, name="proxy-memory") as (server, target):
                workers = server.worker_pids()
                state["workers"] = workers
                samples.update({pid: [] for pid in workers})
                rate = float(
                    self.phases.get("closed", {}).get("mix", {}).get("requests_per_s", 2000)
                )
                chunk_limit = min(180, int(PHASE_LIMIT_SECONDS) - 40)
                slack = 2 * args.connections
                chunks = 0
                for mark, goal in (("first", args.memory_first), ("last", args.memory_requests)):
                    while goal - state["served"] > slack:
                        chunks += 1
                        if chunks > 500:
                            raise RuntimeError("memory phase: too many chunks")
                        remaining = goal - state["served"]
                        seconds = max(
                            2, min(chunk_limit, math.ceil(remaining / max(rate, 1.0) * 1.05))
                        )
                        size = min(args.memory_pool, max(remaining, 100))
                        pool, signed_at = self.signed_pool(target, args.memory_workload, size)
                        lua, _ = self.pool_files(pool, "memory")
                        # wrk stops sending at the limit; up to --connections are then lost
                        limit = remaining + args.connections
                        result = self._memory_chunk(
                            server, target, lua, seconds, limit, state["served"]
                        )
                        self.note_window(signed_at)
                        if result.requests == 0:
                            raise RuntimeError("memory phase: a chunk completed no request")
                        state["served"] += result.requests
                        rate = result.rps or rate
                        server.truncate_log()  # 1M request lines would fill the disk
                        time.sleep(0.5)
                        for pid in workers:
                            kib = rss_kib(pid)
                            if kib is not None:
                                samples[pid].append((state["served"], kib))
                        say(
                            f"    memory: {state['served']:,}/{args.memory_requests:,} requests"
                            f" at {result.rps:,.0f} req/s; RSS "
                            + ", ".join(f"{(rss_kib(p) or 0) / 1024:.1f} MiB" for p in workers)
                        )
                    for pid in workers:
                        if samples[pid]:
                            marks.setdefault(pid, {})[mark] = samples[pid][-1][1]
                    if mark == "first":
                        state["first_served"] = state["served"]
                state["replaced"] = sorted(set(server.worker_pids()) ^ set(workers))
        finally:
            entries: dict[str, Any] = {}
            for pid, points in samples.items():
                seen = marks.get(pid, {})
                if "first" not in seen or "last" not in seen:
                    continue
                entries[str(pid)] = {
                    "first_kib": seen["first"],
                    "last_kib": seen["last"],
                    "change_pct": round((seen["last"] - seen["first"]) / seen["first"] * 100, 2),
                    "samples": points,
                }
            self.phases["memory"] = {
                "workload": args.memory_workload,
                "first_requests": state["first_served"],
                "last_requests": state["served"],
                "seconds": round(time.monotonic() - started, 1),
                "workers": entries,
                "workers_replaced": state.get("replaced"),
                "pool_per_chunk": args.memory_pool,
                "complete": bool(entries),
                "partial_samples": {str(k): v for k, v in samples.items()} if not entries else {},
            }

    def _memory_chunk(
        self, server: Any, target: Any, lua: Path, seconds: int, limit: int, served: int
    ) -> Any:
        from .environment import rss_kib
        from .wrk import run_wrk

        workers = server.worker_pids()

        def progress(elapsed: float) -> None:
            rss = ", ".join(f"{(rss_kib(pid) or 0) / 1024:.1f}" for pid in workers)
            say(f"    memory: chunk {elapsed:4.0f}/{seconds} s after {served:,}; RSS MiB {rss}")

        return run_wrk(
            f"{target.base_url}/",
            lua,
            self.wrk_settings(seconds),
            max_requests=limit,
            progress=progress,
            progress_every=10.0,
        )


def pair_ratio(a_runs: list[dict[str, Any]], b_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """B/A of alternated runs: median and per pair, raw and per server CPU-second."""
    pairs = [
        b["requests_per_s"] / a["requests_per_s"]
        for a, b in zip(a_runs, b_runs, strict=True)
        if a["requests_per_s"]
    ]
    pairs_cpu = [
        b["requests_per_proxy_cpu_s"] / a["requests_per_proxy_cpu_s"]
        for a, b in zip(a_runs, b_runs, strict=True)
        if a["requests_per_proxy_cpu_s"] and b["requests_per_proxy_cpu_s"]
    ]
    return {
        "median": sorted(pairs)[len(pairs) // 2] if pairs else None,
        "per_pair": [round(value, 4) for value in pairs],
        "per_cpu_median": sorted(pairs_cpu)[len(pairs_cpu) // 2] if pairs_cpu else None,
        "per_cpu_per_pair": [round(value, 4) for value in pairs_cpu],
    }


def run_open_loop(
    pool_json: Path,
    port: int,
    *,
    rate: float,
    duration: float,
    warmup: float,
    connections: int,
    progress_every: float,
) -> subprocess.CompletedProcess[str]:
    """Run the open-loop generator (xksbench.openloop) to completion; its last stdout
    line is the JSON result."""
    from .environment import python_env

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "xksbench.openloop",
            "--pool",
            str(pool_json),
            "--port",
            str(port),
            "--rate",
            str(rate),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
            "--connections",
            str(connections),
            "--progress-every",
            str(progress_every),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=python_env(),
        timeout=duration + warmup + 120,
        check=False,
    )


def tls_probe(target: Any) -> str:
    """The protocol and cipher a default client negotiates with the HTTPS proxy."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=target.ca_file)
    with (
        socket.create_connection((target.host, target.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=target.host) as tls,
    ):
        cipher = tls.cipher()
        return f"{tls.version()} {cipher[0] if cipher else '?'}"


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    from . import report
    from .environment import machine_info

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {
        "started": stamp,
        "command": " ".join(["bench/run", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(),
        "config": {
            "phases": args.phase_list,
            "quick": args.quick,
            "workers": args.workers,
            "wrk": {
                "threads": args.threads,
                "connections": args.connections,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "repeat": args.repeat,
            },
            "closed_workloads": args.workloads,
            "mix_weights": args.weights,
            "open": {
                "rate": args.rate,
                "duration_s": args.open_duration,
                "warmup_s": args.open_warmup,
                "connections": args.open_connections,
                "workload": args.open_workload,
            },
            "https_workload": args.https_workload,
            "pool": args.pool,
            "memory": {
                "requests": args.memory_requests,
                "first": args.memory_first,
                "workload": args.memory_workload,
                "pool_per_chunk": args.memory_pool,
            },
            "pkcs11_seconds": args.pkcs11_seconds,
            "proxy_log_level": args.log_level,
            "proxy_health_port": not args.no_health_port,
            "proxy_audit_log": "off" if args.no_audit else "fsync" if args.audit_fsync else "on",
            "wait_quiet_s": args.wait_quiet,
            "quiet_cores": args.quiet_cores,
            "payload": "Encrypt: 32-byte plaintext, 40-byte AAD, no CDIV; key 'foo'",
        },
        "phases": {},
    }
    machine = results["machine"]
    say(
        f"xks-proxy bench {stamp}: {machine['cpu_model']}, {machine['cpus_usable']} CPUs, "
        f"Python {machine['python']}, {machine['openssl']}, {machine['softhsm']}"
    )
    say(f"phases: {', '.join(args.phase_list)}; load average {machine['loadavg_at_start']}")
    work = Path(tempfile.mkdtemp(prefix="xks-bench-"))
    began = time.monotonic()
    failed: BaseException | None = None
    bench = Bench(args, work, results)
    try:
        bench.run()
    except (Exception, KeyboardInterrupt) as exc:
        failed = exc
        say(f"\nbench/run: stopped: {type(exc).__name__}: {exc}")
        results["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    results["longest_signed_to_end_s"] = round(bench.longest_signed_window, 1)
    results["ratios"] = {k: round(v, 4) for k, v in report.ratios(results).items()}
    results["targets"] = report.check_targets(results)
    json_path = args.output_dir / f"{stamp}.json"
    png_path = args.output_dir / f"{stamp}.png"
    report.write_json(json_path, results)
    plotted = report.plot(png_path, results) if results["phases"] else False
    say("\n" + report.summary_table(results))
    say(
        f"\n  every phase ended {results['longest_signed_to_end_s']:.0f} s or less after "
        "its requests were signed (limit 240 s)"
    )
    say(f"\nresults: {json_path}" + (f"\nplot:    {png_path}" if plotted else ""))
    say(f"total {results['elapsed_s']:.0f} s")
    return 1 if failed is not None else 0
