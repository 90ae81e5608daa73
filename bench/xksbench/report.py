"""Summary table, target checks, JSON result file and latency plot."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TARGETS = {
    "closed_rps": 10_000.0,  # closed-loop HTTP Encrypt, req/s
    "closed_vs_echo": 0.25,  # ... and at least this share of the bare-echo ceiling
    "open_p99_ms": 5.0,  # open loop at 1800 req/s: p99 from the scheduled time
    "https_vs_http": 0.85,  # HTTPS within 15% of HTTP
    "rss_change_pct": 10.0,  # worker RSS flat within +-10% from 10k to N requests
}


def _fmt_ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(
        cell.ljust(width) if i < 2 else cell.rjust(width)
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
    )


def summary_table(results: dict[str, Any]) -> str:
    """The human summary: one row per measured phase, then ratios and target checks."""
    phases = results["phases"]
    header = [
        *("phase", "workload", "req/s", "errors", "p50 ms", "p90", "p99", "p99.9", "max"),
        *("server cores by worker", "others"),
    ]
    rows: list[list[str]] = []

    def add(name: str, workload: str, data: dict[str, Any], errors: str, rate: float) -> None:
        latency = data.get("latency_ms", {})
        by_process = data.get("cpu_cores_by_process", {})
        workers = "+".join(f"{v:.2f}" for k, v in by_process.items() if k != "supervisor")
        if not workers and "proxy_cpu_cores" in data:
            workers = f"{data['proxy_cpu_cores']:.2f}"
        rows.append(
            [
                name,
                workload,
                f"{rate:,.0f}",
                errors,
                *(_fmt_ms(latency.get(k)) for k in ("p50", "p90", "p99", "p99.9", "max")),
                workers or "-",
                f"{data['other_processes_cores']:.2f}" if "other_processes_cores" in data else "-",
            ]
        )

    for mode, data in phases.get("pkcs11", {}).items():
        rows.append([f"pkcs11 {mode}", "encrypt", f"{data['ops_per_s']:,.0f}", "-"] + ["-"] * 7)
    if "echo" in phases:
        echo = phases["echo"]
        add("echo (HTTP)", "fixed JSON", echo, _wrk_errors(echo), echo["requests_per_s"])
        paired = echo.get("paired_proxy_encrypt")
        if paired:
            add("  paired proxy", "encrypt", paired, _wrk_errors(paired), paired["requests_per_s"])
    if "floor" in phases:
        for key, name in (
            ("thread", "floor, HSM thread"),
            ("inline", "floor, HSM on loop"),
            ("proxy_encrypt", "  proxy, same turns"),
        ):
            data = phases["floor"][key]
            add(name, "encrypt", data, _wrk_errors(data), data["requests_per_s"])
        opens = (("open_thread", "floor open, HSM thread"), ("open_proxy", "  proxy open"))
        for key, name in opens:
            data = phases["floor"].get(key)
            if data:
                add(name, "encrypt", data, str(data["errors"]), data["achieved_rate"])
    for workload, data in phases.get("closed", {}).items():
        add("closed HTTP", workload, data, _wrk_errors(data), data["requests_per_s"])
    if "open" in phases:
        data = phases["open"]
        add(
            f"open {data['target_rate']:.0f}/s",
            data.get("workload", "encrypt"),
            data,
            str(data["errors"]),
            data["achieved_rate"],
        )
    if "https" in phases:
        data = phases["https"]
        workload = data.get("workload", "encrypt")
        add("closed HTTPS", workload, data, _wrk_errors(data), data["requests_per_s"])
        paired = data.get("paired_http")
        if paired:
            add("  paired HTTP", workload, paired, _wrk_errors(paired), paired["requests_per_s"])

    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [_row(header, widths), _row(["-" * w for w in widths], widths)]
    lines += [_row(row, widths) for row in rows]
    lines.append("")
    lines += [f"  {text}" for text in ratio_lines(results)]
    memory = phases.get("memory")
    if memory and not memory.get("complete"):
        lines += ["", "  memory: incomplete (see partial_samples in the JSON file)"]
    elif memory:
        lines.append("")
        lines.append(
            f"  memory ({memory['workload']}): RSS per worker after "
            f"{memory['first_requests']:,} and after {memory['last_requests']:,} requests"
        )
        for pid, entry in memory["workers"].items():
            lines.append(
                f"    worker {pid}: {entry['first_kib'] / 1024:.1f} MiB -> "
                f"{entry['last_kib'] / 1024:.1f} MiB ({entry['change_pct']:+.1f}%)"
            )
    lines.append("")
    lines += ["  targets:"] + [f"    {line}" for line in target_lines(results)]
    return "\n".join(lines)


def _wrk_errors(data: dict[str, Any]) -> str:
    sockets = sum(data["socket_errors"].values())
    return f"{data['non_2xx']}/{sockets}"


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """Throughput ratios, raw and per CPU-second of the server under test.

    The raw ratios compare runs made at different moments; on a machine shared with
    other work each run gets a different share of the CPUs. Requests per CPU-second
    of the server's own processes hardly depends on that share, so the "_per_cpu"
    ratios are the steadier comparison (they assume the server could use every core).
    """
    phases = results["phases"]
    out: dict[str, float] = {}
    paired = phases.get("echo", {}).get("paired_ratio_proxy_to_echo") or {}
    if paired.get("median") is not None:
        out["paired_encrypt_vs_echo"] = paired["median"]
    if paired.get("per_cpu_median") is not None:
        out["paired_encrypt_vs_echo_per_cpu"] = paired["per_cpu_median"]
    floor = phases.get("floor", {})
    for key, name in (
        ("ratio_proxy_to_thread", "proxy_vs_floor"),
        ("ratio_inline_to_thread", "floor_inline_vs_thread"),
    ):
        paired = floor.get(key) or {}
        if paired.get("median") is not None:
            out[name] = paired["median"]
        if paired.get("per_cpu_median") is not None:
            out[f"{name}_per_cpu"] = paired["per_cpu_median"]
    paired = phases.get("https", {}).get("paired_ratio_https_to_http") or {}
    if paired.get("median") is not None:
        out["paired_https_vs_http"] = paired["median"]
    if paired.get("per_cpu_median") is not None:
        out["paired_https_vs_http_per_cpu"] = paired["per_cpu_median"]
    closed = phases.get("closed", {}).get("encrypt")
    if closed:
        rps = closed["requests_per_s"]
        per_cpu = closed.get("requests_per_proxy_cpu_s")
        echo = phases.get("echo")
        if echo and echo["requests_per_s"]:
            out["closed_encrypt_vs_echo"] = rps / echo["requests_per_s"]
            if per_cpu and echo.get("requests_per_proxy_cpu_s"):
                out["closed_encrypt_vs_echo_per_cpu"] = per_cpu / echo["requests_per_proxy_cpu_s"]
        for mode, data in phases.get("pkcs11", {}).items():
            out[f"closed_encrypt_vs_pkcs11_{mode}"] = rps / data["ops_per_s"]
        https = phases.get("https")
        if https and rps:
            out["https_vs_http"] = https["requests_per_s"] / rps
            if per_cpu and https.get("requests_per_proxy_cpu_s"):
                out["https_vs_http_per_cpu"] = https["requests_per_proxy_cpu_s"] / per_cpu
    return out


def ratio_lines(results: dict[str, Any]) -> list[str]:
    names = {
        "closed_encrypt_vs_echo": "closed HTTP encrypt / bare echo ceiling",
        "closed_encrypt_vs_pkcs11_bare": "closed HTTP encrypt / bare python-pkcs11 (1 thread)",
        "closed_encrypt_vs_pkcs11_manager": "closed HTTP encrypt / Pkcs11KeyManager (1 thread)",
        "https_vs_http": "closed HTTPS / closed HTTP (encrypt)",
        "closed_encrypt_vs_echo_per_cpu": "per CPU-second: closed HTTP encrypt / bare echo",
        "https_vs_http_per_cpu": "per CPU-second: closed HTTPS / closed HTTP (encrypt)",
        "paired_encrypt_vs_echo": "paired runs: proxy encrypt / bare echo",
        "paired_encrypt_vs_echo_per_cpu": "paired runs, per CPU-second: proxy encrypt / echo",
        "paired_https_vs_http": "paired runs: HTTPS / HTTP (encrypt)",
        "proxy_vs_floor": "alternated runs: proxy encrypt / floor (HTTP + HSM thread)",
        "proxy_vs_floor_per_cpu": "alternated runs, per CPU-second: proxy / floor",
        "floor_inline_vs_thread": "alternated runs: floor, HSM on loop / on HSM thread",
        "floor_inline_vs_thread_per_cpu": "alternated, per CPU-second: floor loop / thread",
        "paired_https_vs_http_per_cpu": "paired runs, per CPU-second: HTTPS / HTTP",
    }
    lines = [
        "errors: closed loop = non-2xx/socket errors; open loop = all errors. server cores:",
        "CPU of each worker during the run; others: CPU used by processes not in the bench",
    ]
    lines += [f"{names[k]}: {v:.1%}" for k, v in results.get("ratios", {}).items() if k in names]
    phases = results["phases"]
    named = [("echo", phases["echo"])] if "echo" in phases else []
    if "floor" in phases:
        named += [(f"floor {k}", phases["floor"][k]) for k in ("thread", "inline")]
    named += [(f"closed {w}", d) for w, d in phases.get("closed", {}).items()]
    if "https" in phases:
        named.append((f"https {phases['https'].get('workload', '')}", phases["https"]))
    for label, data in named:
        per_core = data.get("requests_per_proxy_cpu_s")
        if per_core:
            lines.append(
                f"{label}: {per_core:,.0f} requests per server CPU-second "
                f"(server used {data['proxy_cpu_cores']:.2f} cores, "
                f"wrk {data['load_generator_cores']:.2f})"
            )
    opened = phases.get("open")
    if opened and opened.get("proxy_cpu_cores"):
        lines.append(
            f"open loop: {opened['target_rate']:.0f} req/s took {opened['proxy_cpu_cores']:.2f} "
            f"proxy cores ({opened['target_rate'] / opened['proxy_cpu_cores']:,.0f} requests "
            f"per CPU-second); errors by name: "
            f"{opened.get('non_200_by_error_name_incl_warmup') or 'none'}"
        )
    return lines


def check_targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    phases = results["phases"]
    checks: dict[str, dict[str, Any]] = {}
    closed = phases.get("closed", {}).get("encrypt")
    if closed:
        rps = closed["requests_per_s"]
        checks["closed_http_rps"] = {
            "target": f">= {TARGETS['closed_rps']:,.0f} req/s",
            "measured": f"{rps:,.0f} req/s",
            "met": rps >= TARGETS["closed_rps"],
        }
    ratio_values = results.get("ratios", {})
    share = ratio_values.get("paired_encrypt_vs_echo", ratio_values.get("closed_encrypt_vs_echo"))
    if share is not None:
        how = "paired runs" if "paired_encrypt_vs_echo" in ratio_values else "separate phases"
        checks["closed_http_vs_echo"] = {
            "target": f">= {TARGETS['closed_vs_echo']:.0%} of bare echo",
            "measured": f"{share:.1%} ({how})",
            "met": share >= TARGETS["closed_vs_echo"],
        }
    opened = phases.get("open")
    if opened:
        p99 = opened["latency_ms"].get("p99", math.inf)
        checks["open_loop"] = {
            "target": f"{opened['target_rate']:.0f}/s: p99 <= {TARGETS['open_p99_ms']:g} ms, "
            "0 errors",
            "measured": f"p99 {p99:.2f} ms, {opened['errors']} errors, "
            f"{opened['achieved_rate']:,.0f}/s achieved",
            "met": p99 <= TARGETS["open_p99_ms"] and opened["errors"] == 0,
        }
    share = ratio_values.get("paired_https_vs_http", ratio_values.get("https_vs_http"))
    if share is not None:
        how = "paired runs" if "paired_https_vs_http" in ratio_values else "separate phases"
        checks["https_vs_http"] = {
            "target": ">= 85% of HTTP (within 15%)",
            "measured": f"{share:.1%} ({how})",
            "met": share >= TARGETS["https_vs_http"],
        }
    memory = phases.get("memory")
    if memory and memory["workers"]:
        worst = max(abs(entry["change_pct"]) for entry in memory["workers"].values())
        checks["rss_flat"] = {
            "target": f"+-{TARGETS['rss_change_pct']:g}% from "
            f"{memory['first_requests']:,} to {memory['last_requests']:,} requests",
            "measured": f"worst worker {worst:+.1f}%",
            "met": worst <= TARGETS["rss_change_pct"],
        }
    return checks


INVOLVED = {
    "closed_http_rps": (("closed", "encrypt"),),
    "closed_http_vs_echo": (("echo",), ("echo", "paired_proxy_encrypt")),
    "open_loop": (("open",),),
    "https_vs_http": (("https",), ("https", "paired_http")),
}
PER_CPU = {
    "closed_http_vs_echo": "paired_encrypt_vs_echo_per_cpu",
    "https_vs_http": "paired_https_vs_http_per_cpu",
}
BUSY_CORES = 0.25


def _interference(results: dict[str, Any], name: str) -> float:
    """The most CPU other processes used during the runs a check compares."""
    worst = 0.0
    for path in INVOLVED.get(name, ()):
        data: Any = results["phases"]
        for key in path:
            data = data.get(key, {}) if isinstance(data, dict) else {}
        worst = max(worst, float(data.get("other_processes_cores", 0.0) or 0.0))
    return worst


def target_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, check in results.get("targets", {}).items():
        line = f"[{'met' if check['met'] else 'MISSED'}] {name}: {check['measured']}"
        line += f" (target {check['target']})"
        busy = _interference(results, name)
        if busy > BUSY_CORES:
            line += f"  ! other processes used up to {busy:.2f} cores"
            per_cpu = results.get("ratios", {}).get(PER_CPU.get(name, ""))
            if per_cpu is not None:
                line += f"; per CPU-second {per_cpu:.1%}"
        lines.append(line)
    return lines


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def plot(path: Path, results: dict[str, Any]) -> bool:
    """Percentile curves (log latency against 1/(1-p)) per phase; RSS panel if measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  matplotlib missing: no plot (bench/run installs it with .[bench])")
        return False
    phases = results["phases"]
    curves: list[tuple[str, list[list[float]]]] = []
    if "echo" in phases:
        curves.append(("echo ceiling (closed)", phases["echo"]["curve_ms"]))
    if "floor" in phases:
        curves.append(("floor, HSM thread (closed)", phases["floor"]["thread"]["curve_ms"]))
        if phases["floor"].get("open_thread"):
            curves.append(("floor, HSM thread (open)", phases["floor"]["open_thread"]["curve_ms"]))
    for workload, data in phases.get("closed", {}).items():
        curves.append((f"closed HTTP {workload}", data["curve_ms"]))
    if "https" in phases:
        curves.append(("closed HTTPS encrypt", phases["https"]["curve_ms"]))
    if "open" in phases:
        data = phases["open"]
        curves.append((f"open {data['target_rate']:.0f}/s (from schedule)", data["curve_ms"]))
    memory = phases.get("memory")
    memory = memory if memory and memory.get("complete") else None
    panels = 2 if memory else 1
    figure, axes = plt.subplots(1, panels, figsize=(7 * panels, 5.2), squeeze=False)
    axis = axes[0][0]
    for label, curve in curves:
        points = [(p, ms) for p, ms in curve if p < 100 and ms > 0]
        if not points:
            continue
        xs = [1.0 / (1.0 - p / 100.0) for p, _ in points]
        axis.plot(xs, [ms for _, ms in points], marker=".", label=label)
    axis.set_xscale("log")
    axis.set_yscale("log")
    ticks = [2, 10, 100, 1000, 10000]
    axis.set_xticks(ticks)
    axis.set_xticklabels(["50%", "90%", "99%", "99.9%", "99.99%"])
    axis.set_xlabel("percentile")
    axis.set_ylabel("latency (ms, log scale)")
    axis.axhline(5.0, color="grey", linestyle=":", linewidth=1)
    axis.grid(True, which="both", alpha=0.3)
    if curves:
        axis.legend(fontsize=8)
    machine = results["machine"]
    axis.set_title(
        f"xks-proxy latency, {results['config']['workers']} workers, "
        f"{machine['cpus_usable']} CPUs\n{results['started']}",
        fontsize=10,
    )
    if memory:
        axis2 = axes[0][1]
        for pid, entry in memory["workers"].items():
            samples = entry["samples"]
            axis2.plot(
                [s[0] for s in samples],
                [s[1] / 1024 for s in samples],
                marker="o",
                label=f"worker {pid}",
            )
        axis2.set_xlabel("requests served (all workers)")
        axis2.set_ylabel("RSS (MiB)")
        axis2.set_title(f"worker RSS ({memory['workload']} workload)", fontsize=10)
        axis2.grid(True, alpha=0.3)
        axis2.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
