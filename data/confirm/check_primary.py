"""An independent check of the confirmatory study's seven primary rows, from results.json alone.

    python data/confirm/check_primary.py data/confirm/main           # at the end of training
    python data/confirm/check_primary.py data/confirm/main --best    # at each run's lowest val loss

It imports nothing from lookaround.py: each row's metric is read from the raw fields the protocol
names (README, "The confirmatory study"), the sign-flip p enumerates every sign pattern, and Holm's
adjustment runs over the seven rows (one that did not run counts as p = 1). Its numbers should equal
the primary rows lookaround.py prints for the same folder.
"""
import argparse
import glob
import itertools
import json
import math
import os
import sys

import numpy as np
from scipy import stats

FINETUNE_N = "128"


def finetune_acc(r):
    return r["finetune"][FINETUNE_N]["acc"]


def log_ppl(r):  # every prefix length 1..T-1: the log of the perplexity over all of them
    return math.log(r["gen"]["ppl"])


def log_ppl_short(r):  # prefix lengths 1..T/4: the mean log perplexity over those lengths
    by_length = r["gen"]["ppl_by_length"]  # T - 1 entries, entry l - 1 after a prefix of l tokens
    return float(np.mean(np.log(by_length[:(len(by_length) + 1) // 4])))


def grammatical(r):  # the language's judgement of the model's own left-to-right samples
    return r["gen"]["samples"]["left_to_right"]["grammatical"]


# (name, metric, a, b): the difference a - b, positive on the paper's side
PRIMARY = [
    ("masked clusters better", finetune_acc, "mlm", "ar"),
    ("ar_diverse clusters better", finetune_acc, "ar_diverse", "ar"),
    ("AR generates better (log ppl)", log_ppl, "mlm", "ar"),
    ("AR generates better (grammatical)", grammatical, "ar", "mlm"),
    ("mlm_varlen generates better (log ppl 1..T/4)", log_ppl_short, "mlm", "mlm_varlen"),
    ("matched: mlm_half - varlen_bert (log ppl 1..T/4)", log_ppl_short, "mlm_half", "varlen_bert"),
    ("mlm_varlen generates better (grammatical)", grammatical, "mlm_varlen", "mlm"),
]


def sign_flip_p(d):
    """Two-sided: the share of all 2^n sign patterns whose |sum| reaches the observed |sum|."""
    d = np.asarray(d, dtype=float)
    observed = abs(d.sum()) * (1 - 1e-9)
    hits = sum(abs(np.dot(signs, d)) >= observed
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


def holm(p):
    order, out, running = np.argsort(p, kind="stable"), [None] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder",
                        help="a study's --out_dir: <member>/seed<k>/results.json under it")
    parser.add_argument("--best", action="store_true",
                        help="read each run's lowest-val-loss weights")
    args = parser.parse_args()
    runs = {}
    for path in glob.glob(os.path.join(args.folder, "*", "seed*", "results.json")):
        with open(path) as f:
            r = json.load(f)
        if args.best and not r["best"]["final"]:  # "best" holds the same metrics for those weights
            r = dict(r, finetune=r["best"]["finetune"], gen=r["best"]["gen"])
        runs[r["objective"], r["seed"]] = r
    if not runs:
        sys.exit(f"{args.folder}: no <member>/seed<k>/results.json under it")
    rows = []
    for name, metric, a, b in PRIMARY:
        seeds = sorted(s for (m, s) in runs if m == a and (b, s) in runs)
        d = [metric(runs[a, s]) - metric(runs[b, s]) for s in seeds]
        rows.append((name, a, b, seeds, d))
    # a row that did not run counts as p = 1 in the family of seven
    p = [sign_flip_p(d) if len(d) > 1 else 1.0 for *_, d in rows]
    adjusted = holm(p)
    print(f"{args.folder} ({'lowest val loss' if args.best else 'end of training'}); "
          "difference > 0 is the paper's side")
    print(f"{'row':<50}{'n':>3}{'mean':>9}{'95% t-interval':>20}{'p flip':>9}{'Holm':>8}{'> 0':>6}"
          "  verdict")
    for (name, a, b, seeds, d), p_row, p_holm in zip(rows, p, adjusted):
        if len(d) < 2:
            print(f"{name:<50}{len(d):>3}  too few paired seeds")
            continue
        mean, sd = float(np.mean(d)), float(np.std(d, ddof=1))
        half = stats.t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))
        verdict = "inconclusive" if p_holm >= 0.05 else "reproduced" if mean > 0 else "contradicted"
        print(f"{name:<50}{len(d):>3}{mean:>+9.4f}{f'[{mean - half:+.4f}, {mean + half:+.4f}]':>20}"
              f"{p_row:>9.4f}{p_holm:>8.4f}{sum(x > 0 for x in d):>6}  {verdict}")


if __name__ == "__main__":
    main()
