"""The firehose chart: one PNG, panels sharing the time axis, so a person can see at a
glance whether connections, churn, queries and Postgres backends behaved over the run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # no display: render straight to a file

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .stats import percentile  # noqa: E402

if TYPE_CHECKING:
    from .main import Row


def draw(rows: list[Row], path: Path, summary: dict) -> None:
    t = [r.second + 1 for r in rows]
    fails = [
        sum(r.connect_failures.values()) + sum(r.query_failures.values()) + sum(r.drops.values())
        for r in rows
    ]
    fig, axes = plt.subplots(5, 1, figsize=(11, 14), sharex=True, constrained_layout=True)
    opts = summary["options"]
    fig.suptitle(
        f"pgfleet firehose → {summary['target']}: {opts['connections']} connections, "
        f"churn {opts['churn']:g}/s, {opts['qps']:g} qps ({opts['write_ratio']:.0%} writes), "
        f"{summary['procs']} processes\n"
        + ("OK" if not summary["problems"] else "FAILED: " + "; ".join(summary["problems"])),
        fontsize=11,
        color="black" if not summary["problems"] else "firebrick",
    )

    ax = axes[0]
    ax.plot(t, [r.held for r in rows], label="held (logged in)", color="tab:blue", lw=2)
    ax.plot(t, [r.pending for r in rows], label="logins in progress", color="tab:cyan", ls="--")
    ax.axhline(opts["connections"], color="grey", ls=":", lw=1, label="target")
    ax.set_ylabel("client connections")
    ax.set_title("Connections held", loc="left")
    ax.legend(loc="lower right", fontsize=8)

    ax = axes[1]
    ax.plot(t, [r.opened for r in rows], label="opened /s", color="tab:green", lw=2)
    ax.plot(t, [r.closed for r in rows], label="closed by churn /s", color="tab:olive", ls="--")
    ax.bar(t, fails, color="tab:red", alpha=0.7, label="failures /s (connect + query + dropped)")
    ax.set_ylabel("per second")
    ax.set_title("Churn", loc="left")
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[2]
    ax.plot(t, [r.queries for r in rows], label="queries ok /s", color="tab:purple", lw=2)
    ax.plot(t, [r.skipped for r in rows], label="skipped (no idle conn) /s", color="tab:pink", ls="--")
    ax.set_ylabel("queries per second")
    ax.set_title("Queries and latency", loc="left")
    lat = ax.twinx()
    for q, style in ((50, "-"), (99, "--")):
        lat.plot(t, [percentile(r.qlat, q) for r in rows], color="tab:orange", ls=style,
                 label=f"query p{q} ms")
    lat.plot(t, [percentile(r.clat, 99) for r in rows], color="tab:brown", ls=":",
             label="login p99 ms")
    lat.set_ylabel("latency (ms)")
    lat.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = lat.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8, ncol=2)

    ax = axes[3]
    if summary["backend_sampling"]:
        ax.plot(t, [r.backends for r in rows], color="tab:blue", lw=2, drawstyle="steps-mid",
                label="client backends (max per second)")
        if summary["max_backends"] is not None:
            ax.axhline(summary["max_backends"], color="tab:red", ls="--",
                       label=f"--max-backends {summary['max_backends']}")
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "not sampled (no --direct-dsn / --home)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_ylabel("Postgres backends")
    ax.set_title("Postgres client backends (pg_stat_activity)", loc="left")

    ax = axes[4]
    ax.plot(t, [r.cpu_max for r in rows], color="tab:gray", lw=2,
            label="CPU % of the busiest load process")
    ax.set_ylabel("CPU % (100 = one core)")
    ax.set_ylim(bottom=0)
    lag = ax.twinx()
    lag.plot(t, [r.lag_max for r in rows], color="tab:red", ls="--", label="event-loop lag max")
    lag.set_ylabel("lag (ms)")
    lag.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = lag.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax.set_title("Load generator (is the generator itself the bottleneck?)", loc="left")
    ax.set_xlabel("seconds since start")

    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_xlim(0.5, max(t) + 0.5 if t else 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        top = ax.get_ylim()[1]
        ax.set_ylim(0, top * 1.3 if top > 0 else 1)  # every series is >= 0; room for legends
    fig.savefig(path, dpi=90)
    plt.close(fig)
