#!/usr/bin/env python3
"""A/B two source trees of xks-proxy on this machine, alternating runs.

    .venv/bin/python bench/ab.py SRC_A SRC_B [--mode closed|open] [--pairs N]

SRC_A and SRC_B are ``src`` directories (e.g. of ``git worktree add /tmp/base HEAD~1``
and of this checkout). Both proxies run at once (2 workers each, the bench's token
and config); runs alternate A, B, A, B... so each pair sees nearly the same machine.
``closed``: wrk Encrypt, N pairs of 5 s (bench/run's paired_runs), prints the median
B/A ratio of req/s and of requests per server CPU-second. ``open``: N pairs of 10 s
at 1800 req/s (after 2 s warm-up), prints each run's latency and the medians.
This VM's speed drifts by 20-40% within minutes: compare code only this way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from xksbench.cli import Bench, build_parser, resolve, run_open_loop
from xksbench.environment import BenchToken


def open_loop(bench: Bench, server: Any, target: Any, rate: int) -> dict[str, float]:
    pool, _ = bench.signed_pool(target, "encrypt", 1000)
    _, pool_json = bench.pool_files(pool, "open")
    before = server.cpu_seconds()
    done = run_open_loop(
        pool_json,
        target.port,
        rate=rate,
        duration=10,
        warmup=2,
        connections=512,
        progress_every=100,
    )
    done.check_returncode()
    after = server.cpu_seconds()
    data = json.loads(done.stdout.strip().splitlines()[-1])
    latency = data["latency_ms"]
    cores = sum(after.get(pid, 0.0) - before.get(pid, 0.0) for pid in after) / 12
    return {
        "p50": latency["p50"],
        "p99": latency["p99"],
        "p99.9": latency["p99.9"],
        "errors": data["errors"],
        "cores": cores,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src_a")
    parser.add_argument("src_b")
    parser.add_argument("--mode", choices=("closed", "open"), default="closed")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--rate", type=int, default=1800)
    options = parser.parse_args()
    args = resolve(
        build_parser().parse_args(
            ["--repeat", str(options.pairs), "--duration", "5", "--warmup", "1"]
        )
    )
    work = Path(tempfile.mkdtemp(prefix="xks-ab-"))
    bench = Bench(args, work, {"phases": {}})
    bench.token = BenchToken.provision(work / "token")
    servers = []
    contexts = []
    for source, name in ((options.src_a, "A"), (options.src_b, "B")):
        os.environ["PYTHONPATH"] = str(Path(source).resolve())
        context = bench.proxy(tls=False, name=name)
        servers.append(context.__enter__())
        contexts.append(context)
    try:
        if options.mode == "closed":
            (a_server, a_target), (b_server, b_target) = servers
            a, b, ratio = bench.paired_runs(
                (a_server, a_target, "A"), (b_server, b_target, "B"), "encrypt"
            )
            print(f"A {a['requests_per_s']:,.0f} req/s, {a['requests_per_proxy_cpu_s']:,.0f}/CPU-s")
            print(f"B {b['requests_per_s']:,.0f} req/s, {b['requests_per_proxy_cpu_s']:,.0f}/CPU-s")
            print("B/A", json.dumps(ratio))
            return 0
        results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
        for _ in range(options.pairs):
            for name, (server, target) in zip("AB", servers, strict=True):
                run = open_loop(bench, server, target, options.rate)
                results[name].append(run)
                print(name, " ".join(f"{k} {v:.2f}" for k, v in run.items()), flush=True)
        for name, runs in results.items():
            medians = {
                key: sorted(run[key] for run in runs)[len(runs) // 2]
                for key in ("p50", "p99", "cores")
            }
            print("median", name, " ".join(f"{k} {v:.2f}" for k, v in medians.items()))
        return 0
    finally:
        for context in reversed(contexts):
            context.__exit__(None, None, None)


if __name__ == "__main__":
    raise SystemExit(main())
