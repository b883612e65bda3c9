"""The README's results tables, in Markdown, from the confirmatory study's summary files.

    python data/confirm/tables.py data/confirm

It reads what the three study commands wrote (main/summary.json, main/dose.json and
data300/summary.json) and formats it; it computes nothing but each arm's provenance line (commit,
machine, run time summed from its results.json files). A missing file is skipped with a note.
"""
import glob
import json
import os
import re
import string
import sys

MEMBERS = ["ar", "ar_diverse", "mlm", "mlm_varlen", "mlm_half", "varlen_bert"]
LIMITS = ["the language itself", "the data itself"]
# (column title, summary-table column, digits): the members table
MEMBER_COLUMNS = [("ft n=32", "finetune@32", 3), ("ft n=128", "finetune@128", 3),
                  ("ft n=512", "finetune@512", 3), ("probe (clean)", "clean_probe_acc", 3),
                  ("probe (per-pos)", "per_position_probe_acc", 3), ("NMI (clean)", "clean_nmi", 3),
                  ("ppl", "ppl", 2), ("ppl@1/8", "ppl@0.125", 2),
                  ("grammatical", "left_to_right grammatical", 3)]


def load(path):
    if not os.path.exists(path):
        print(f"<!-- {path}: not there yet -->\n")
        return None
    with open(path) as f:
        return json.load(f)


COMMANDS = {  # the README's three commands, and the members and seeds whose runs each one adds
    "main": ("python lookaround.py --objective all --variants mlm_half,varlen_bert --seeds 9-24 "
             "--out_dir confirm/main", MEMBERS, range(9, 25)),
    "dose": ("python lookaround.py --objective ar --variants ar_diverse,ar_diverse2,ar_diverse8 "
             "--seeds 9-16 --summary_name dose --out_dir confirm/main",
             ["ar_diverse2", "ar_diverse8"], range(9, 17)),
    "data300": ("python lookaround.py --objective all --seeds 9-16 --train_docs 300 "
                "--finetune_labels 32,128 --compare_to confirm/main --out_dir confirm/data300",
                MEMBERS[:4], range(9, 17)),
}


def provenance(folder, arm):
    """Command, commit, machine and run time, once per arm, from the runs it adds."""
    command, members, seeds = COMMANDS[arm]
    runs = []
    for m in members:
        for s in seeds:
            path = os.path.join(folder, m, f"seed{s}", "results.json")
            if os.path.exists(path):
                with open(path) as f:
                    runs.append(json.load(f))
    commits = sorted({r["code"]["commit"][:7] + (" (modified)" if r["code"]["modified"] else "")
                      for r in runs})
    runtimes = sorted({r["settings"]["runtime"]["torch"] for r in runs})
    # train.seconds already holds every curve point's evaluation, the final one included; the
    # lowest-val-loss weights are evaluated apart where they are not the final ones
    best = [r["best"] for r in runs if not r["best"]["final"]]
    seconds = sum(r["train"]["seconds"] for r in runs)
    seconds += sum(b["finetune"].get("seconds", 0) + b["gen"].get("seconds", 0) for b in best)
    hours = seconds / 3600
    print(f"`{command}` · commit {', '.join(commits)} · the 2-core CPU machine, one thread "
          f"a run, torch {', '.join(runtimes)} · {len(runs)} runs of {len(members) * len(seeds)}, "
          f"{hours:.1f} h of run time (training, every evaluation, the lowest-val-loss weights' "
          "fine-tuning and generation)\n")


def p_text(p):
    return "-" if p is None else "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def interval(ci, digits=3):
    return "-" if ci is None else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def row_by_metric(claims, metric):
    return next((c for c in claims or [] if c["metric"] == metric), None)


def primary_table(summary):
    claims = [c for c in summary["claims"] if c["primary"]]
    best = summary.get("claims_best")
    by_iter = summary.get("claims_by_iter") or {}
    budgets = sorted(int(k) for k in by_iter)[:-1]  # the end is the main columns
    print("| # | primary row (difference > 0: the paper's side) | mean diff | 95% interval "
          "| p (sign-flip) | Holm p | seeds > 0 | detectable | verdict | at lowest val loss | "
          + " | ".join(f"at iter {b}" for b in budgets) + " |")
    print("|---|---|---:|---|---:|---:|---:|---:|---|---|" + "---|" * len(budgets))
    for i, c in enumerate(claims, 1):
        b = row_by_metric(best, c["metric"])
        at_best = "-" if b is None else f"{b['verdict']} ({b['mean_diff']:+.3f})"
        at_iter = [row_by_metric(by_iter[str(k)], c["metric"]) for k in budgets]
        cells = ["-" if r is None else f"{r['verdict'] or '-'} ({r['mean_diff']:+.3f})"
                 for r in at_iter]
        detect = "-" if c["detectable"] is None else f"{c['detectable']:.3f}"
        flag = f" ({c['flag']})" if c.get("flag") else ""
        print(f"| {i} | {c['metric']} | {c['mean_diff']:+.3f} | {interval(c['ci95'])} "
              f"| {p_text(c['p_value'])} | {p_text(c['p_holm'])} "
              f"| {c['n_expected_sign']}/{c['n_seeds']} | {detect} "
              f"| **{c['verdict']}**{flag} | {at_best} | " + " | ".join(cells) + " |")
    print()


def cell(table, name, col, digits):
    v = (table.get(name) or {}).get(col)
    if v is None:
        return "-"
    spread = f" ± {v['std']:.{digits}f}" if v["n"] > 1 else ""
    return f"{v['mean']:.{digits}f}{spread}"


def members_table(summary, members=MEMBERS):
    """One row per member, its untrained network's value (same readout, same recipe) in brackets
    where there is one; then the language's limits."""
    table = summary["table"]
    print("| member (untrained) | " + " | ".join(title for title, _, _ in MEMBER_COLUMNS) + " |")
    print("|---|" + "---:|" * len(MEMBER_COLUMNS))
    for name in [m for m in members if m in table] + [n for n in LIMITS if n in table]:
        cells = []
        for _, col, digits in MEMBER_COLUMNS:
            untrained = (table.get(f"random init (as {name})") or {}).get(col)
            cells.append(cell(table, name, col, digits)
                         + (f" ({untrained['mean']:.{digits}f})" if untrained else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()


def secondary_table(summary):
    """One row per claim and measure: its label counts (n=32 / n=512) or readouts (trained /
    clean / per_position) side by side in each cell, so that the table fits the README."""
    groups = {}  # (claim, measure) -> [(label, row)], in the summary's order
    for c in summary["claims"]:
        if c["primary"] or c["ci95"] is None:
            continue
        n = re.search(r"n=\d+", c["metric"])
        measure = re.sub(r"n=\d+ ", "", c["metric"])
        label = " ".join(x for x in (n and n.group(0), c["readout"]) if x) or "-"
        groups.setdefault((c["claim"], measure), []).append((label, c))
    flags = []  # each distinct flag once, under the table
    print("| claim | secondary row | count or readout | mean diff | 95% interval | seeds > 0 "
          "| where it lies |")
    print("|---|---|---|---:|---|---:|---|")
    for (claim, measure), rows in groups.items():
        marks = []
        for _, c in rows:
            if c.get("flag") and c["flag"] not in flags:
                flags.append(c["flag"])
            letter = c.get("flag") and string.ascii_lowercase[flags.index(c["flag"])]
            marks.append(f" [{letter}]" if letter else "")
        cells = [" / ".join(label for label, _ in rows),
                 " / ".join(f"{c['mean_diff']:+.3f}" for _, c in rows),
                 " / ".join(interval(c["ci95"]) for _, c in rows),
                 " / ".join(f"{c['n_expected_sign']}/{c['n_seeds']}" for _, c in rows),
                 " / ".join(c["verdict"].replace("interval ", "") + mark
                            for (_, c), mark in zip(rows, marks))]
        print(f"| {claim} | {measure} | " + " | ".join(cells) + " |")
    print()
    for i, flag in enumerate(flags):
        print(f"[{string.ascii_lowercase[i]}] {flag}\n")


def dose_table(dose):
    members = ["ar", "ar_diverse2", "ar_diverse", "ar_diverse8"]
    print("| member (future tokens) | ft n=128 | ft n=128 - ar [95% interval] "
          "| gain over untrained - ar [95% interval] |")
    print("|---|---:|---|---|")
    futures = {"ar": 1, "ar_diverse2": 2, "ar_diverse": 4, "ar_diverse8": 8}
    for m in members:
        acc = cell(dose["table"], m, "finetune@128", 3)
        if m == "ar":
            print(f"| ar (1) | {acc} | - | - |")
            continue
        d = row_by_metric(dose["claims"], f"fine-tuned acc n=128 {m} - ar")
        g = row_by_metric(dose["claims"], f"fine-tuned gain over untrained n=128 {m} - ar")
        words = ["-" if r is None else f"{r['mean_diff']:+.3f} {interval(r['ci95'])}"
                 for r in (d, g)]
        print(f"| {m} ({futures[m]}) | {acc} | {words[0]} | {words[1]} |")
    print()


def arm_table(arm, main):
    compared = arm["compared"]
    print("each member's change from 3,000 to 300 training documents "
          f"({'; '.join(compared['differ'])}), "
          "paired by seed: the 300-document run minus the 3,000-document run, "
          "end of training / lowest val loss\n")
    members = list(dict.fromkeys(r["member"] for r in compared["rows"]))
    metrics = list(dict.fromkeys(r["metric"] for r in compared["rows"]))
    print("| metric | " + " | ".join(members) + " |")
    print("|---|" + "---|" * len(members))
    for metric in metrics:
        cells = []
        for m in members:
            end, best = (next((r for r in rows if r["member"] == m and r["metric"] == metric), None)
                         for rows in (compared["rows"], compared["rows_best"]))
            cells.append(" / ".join("-" if r is None
                                    else f"{r['mean_diff']:+.3f} {interval(r['ci95'])}"
                                    for r in (end, best)))
        print(f"| {metric} | " + " | ".join(cells) + " |")
    print()
    print("| log ppl mlm_varlen - ar | end of training | lowest val loss |")
    print("|---|---|---|")
    for name, summary in (("3,000 documents (main)", main), ("300 documents", arm)):
        if summary is None:
            continue
        rows = [row_by_metric(summary[key], "log ppl mlm_varlen - ar")
                for key in ("claims", "claims_best")]
        cells = ["-" if r is None else f"{r['mean_diff']:+.3f} {interval(r['ci95'])} "
                 f"({r['n_expected_sign']}/{r['n_seeds']} > 0)" for r in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()


def best_iters(summary):
    """Each member's lowest-val-loss iteration over its runs: where early stopping would read it."""
    by_member = {}
    for r in summary["runs"]:
        by_member.setdefault(r["objective"], []).append(r["best"]["iter"])
    print("| lowest val loss at iteration (min / median / max over seeds) | "
          + " | ".join(by_member) + " |")
    print("|---|" + "---|" * len(by_member))
    cells = []
    for iters in by_member.values():
        iters = sorted(iters)
        median = (iters[(len(iters) - 1) // 2] + iters[len(iters) // 2]) / 2
        cells.append(f"{iters[0]} / {median:g} / {iters[-1]}")
    print("| | " + " | ".join(cells) + " |")
    print()


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "data/confirm"
    main_summary = load(os.path.join(root, "main", "summary.json"))
    dose = load(os.path.join(root, "main", "dose.json"))
    arm = load(os.path.join(root, "data300", "summary.json"))
    if main_summary:
        print("### The seven primary rows\n")
        provenance(os.path.join(root, "main"), "main")
        primary_table(main_summary)
        print("### Every member, end of training (mean ± std over seeds; its untrained "
              "network's mean in brackets)\n")
        members_table(main_summary)
        print("### Secondary rows (interval wording only)\n")
        secondary_table(main_summary)
        best_iters(main_summary)
    if dose:
        print("### Dose-response: ar_diverse's future tokens\n")
        provenance(os.path.join(root, "main"), "dose")
        dose_table(dose)
    if arm:
        print("### Data-constrained arm: 300 training documents\n")
        provenance(os.path.join(root, "data300"), "data300")
        members_table(arm, ["ar", "ar_diverse", "mlm", "mlm_varlen"])
        arm_table(arm, main_summary)
        best_iters(arm)


if __name__ == "__main__":
    main()
