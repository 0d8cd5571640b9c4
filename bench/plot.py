#!/usr/bin/env python3
"""Plots the bench's JSON lines: refresh lag and operator RSS against the number of
tokens, and the operator's CPU per rotation next to the naive curl + kubectl loop.

usage: python3 bench/plot.py [results.jsonl] [out.png]   (needs matplotlib)
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def latest_by_tokens(runs):
    """The last run for each N (later lines replace earlier ones)."""
    by_n = {}
    for r in runs:
        by_n[r["tokens"]] = r
    return [by_n[n] for n in sorted(by_n)]


def pick(runs, scenario, label=None, unrelated=False, paced=False):
    return [
        r
        for r in runs
        if r["scenario"] == scenario
        and (label is None or r.get("label", "") in label)
        and (r["unrelated_secrets"] > 0) == unrelated
        and (r.get("create_rate", 0) > 0) == paced
        and not r.get("operator_env")
    ]


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "bench/results/results.jsonl"
    out = sys.argv[2] if len(sys.argv) > 2 else "bench/results/scale.png"
    with open(src) as f:
        runs = [json.loads(line) for line in f if line.strip().startswith("{")]
    steady_all = pick(runs, "steady", label=("", "repeat"))
    steady = latest_by_tokens(steady_all)
    if not steady:
        sys.exit(f"no steady runs in {src}")

    fig, (lag_ax, rss_ax, cpu_ax) = plt.subplots(1, 3, figsize=(16, 4.8))
    ns = [r["tokens"] for r in steady]

    colors = {"p50": "tab:blue", "p99": "tab:orange", "max": "tab:red"}
    for key, style in (("p50", "o-"), ("p99", "s-"), ("max", "^--")):
        lag_ax.plot(
            ns,
            [r["scg"]["lag_ms"][key] for r in steady],
            style,
            color=colors[key],
            label=f"{key}, all created at once",
        )
        lag_ax.plot(
            [r["tokens"] for r in steady_all],
            [r["scg"]["lag_ms"][key] for r in steady_all],
            ".",
            color=colors[key],
            alpha=0.5,
        )
    paced = pick(runs, "steady", paced=True)
    if paced:
        lag_ax.plot(
            [r["tokens"] for r in paced],
            [r["scg"]["lag_ms"]["p99"] for r in paced],
            "D",
            color="tab:green",
            label="p99, tokens created over 40 s",
        )
    lag_ax.axhline(250, color="grey", linestyle=":", label="goal: p99 < 250 ms")
    lag_ax.set_xscale("log")
    lag_ax.set_yscale("log")
    lag_ax.set_ylim(bottom=1)
    lag_ax.set_xlabel("ScgTokens (60 s lifetimes; dots: other runs)")
    lag_ax.set_ylabel("refresh lag, ms (call - scheduled)")
    lag_ax.set_title("Refresh lag")
    lag_ax.legend(fontsize=8)

    def line(ax, rs, key, style, label):
        rs = latest_by_tokens(rs)
        if rs:
            ax.plot([r["tokens"] for r in rs], [r["operator"][key] for r in rs], style, label=label)

    line(rss_ax, steady_all, "rss_end_mib", "o-", "rotating, all created at once")
    line(rss_ax, paced, "rss_end_mib", "^-", "rotating, created over 40 s")
    line(rss_ax, pick(runs, "idle", paced=True), "rss_end_mib", "s-", "idle, created over time")
    line(
        rss_ax,
        pick(runs, "idle", paced=True, unrelated=True),
        "rss_end_mib",
        "D--",
        "idle, created over time, + 100,000 unrelated Secrets",
    )
    rss_ax.axhline(64, color="grey", linestyle=":", label="goal: 64 MiB")
    rss_ax.set_xscale("log")
    rss_ax.set_yscale("log")
    rss_ax.set_xlabel("ScgTokens")
    rss_ax.set_ylabel("operator RSS, MiB")
    rss_ax.set_title("Operator memory")
    rss_ax.legend(fontsize=8)

    with_naive = [r for r in steady if r.get("naive")]
    labels = [f"N={r['tokens']:,}" for r in with_naive]
    ours = [r["operator"]["cpu_per_rotation_ms"] for r in with_naive]
    theirs = [r["naive"]["cpu_per_rotation_ms"] for r in with_naive]
    x = range(len(with_naive))
    cpu_ax.bar([i - 0.2 for i in x], theirs, width=0.4, label="naive curl + kubectl loop")
    cpu_ax.bar([i + 0.2 for i in x], ours, width=0.4, label="operator")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a > 0:
            cpu_ax.annotate(f"1/{b / a:.0f}", (i + 0.2, a), ha="center", va="bottom")
    cpu_ax.axhline(
        min(theirs) / 50 if theirs else 1, color="grey", linestyle=":", label="goal: 1/50"
    )
    cpu_ax.set_xticks(list(x))
    cpu_ax.set_xticklabels(labels)
    cpu_ax.set_yscale("log")
    cpu_ax.set_ylabel("CPU per rotation, ms")
    cpu_ax.set_title("CPU per token rotation")
    cpu_ax.set_ylim(top=max(theirs + [1]) * 8)
    cpu_ax.legend(fontsize=8, loc="upper left")

    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
