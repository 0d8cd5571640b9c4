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


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "bench/results/results.jsonl"
    out = sys.argv[2] if len(sys.argv) > 2 else "bench/results/scale.png"
    with open(src) as f:
        runs = [json.loads(line) for line in f if line.strip().startswith("{")]
    steady = latest_by_tokens(
        [r for r in runs if r["scenario"] == "steady" and r["unrelated_secrets"] == 0]
    )
    crowded = latest_by_tokens(
        [r for r in runs if r["scenario"] == "steady" and r["unrelated_secrets"] > 0]
    )
    if not steady:
        sys.exit(f"no steady runs in {src}")

    fig, (lag_ax, rss_ax, cpu_ax) = plt.subplots(1, 3, figsize=(15, 4.6))
    ns = [r["tokens"] for r in steady]

    for key, style in (("p50", "o-"), ("p99", "s-"), ("max", "^--")):
        lag_ax.plot(ns, [r["scg"]["lag_ms"][key] for r in steady], style, label=key)
    lag_ax.axhline(250, color="grey", linestyle=":", label="goal: p99 < 250 ms")
    lag_ax.set_xscale("log")
    lag_ax.set_yscale("symlog", linthresh=10)
    lag_ax.set_xlabel("ScgTokens (60 s lifetimes)")
    lag_ax.set_ylabel("refresh lag, ms (call - scheduled)")
    lag_ax.set_title("Refresh lag")
    lag_ax.legend()

    rss_ax.plot(ns, [r["operator"]["rss_end_mib"] for r in steady], "o-", label="RSS at end")
    rss_ax.plot(ns, [r["operator"]["hwm_mib"] for r in steady], "s--", label="peak (VmHWM)")
    if crowded:
        rss_ax.plot(
            [r["tokens"] for r in crowded],
            [r["operator"]["rss_end_mib"] for r in crowded],
            "D",
            label=f"RSS with {crowded[0]['unrelated_secrets']:,} unrelated Secrets",
        )
        rss_ax.plot(
            [r["tokens"] for r in crowded],
            [r["operator"]["hwm_mib"] for r in crowded],
            "x",
            markersize=9,
            label="peak with unrelated Secrets",
        )
    rss_ax.axhline(64, color="grey", linestyle=":", label="goal: 64 MiB")
    rss_ax.set_xscale("log")
    rss_ax.set_xlabel("ScgTokens")
    rss_ax.set_ylabel("operator memory, MiB")
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
    cpu_ax.set_xticks(list(x))
    cpu_ax.set_xticklabels(labels)
    cpu_ax.set_yscale("log")
    cpu_ax.set_ylabel("CPU per rotation, ms")
    cpu_ax.set_title("CPU per token rotation")
    cpu_ax.legend(fontsize=8)

    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
