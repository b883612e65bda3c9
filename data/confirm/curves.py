"""Every run's val-loss curve, one line each, with what would make its end point untrustworthy.

    python data/confirm/curves.py data/confirm/main data/confirm/data300

Per run: the val loss at iterations 0, 250, 500 and 1,000; the iteration of its lowest val loss;
where it left the unigram plateau (results.json's plateau_exit_iter); and flags: a loss at
initialisation far from ln V (a broken start), a value that is not finite, a rise of more than 0.02
between evaluations (an unstable run, or overfitting where the data is small), a run that never left
the plateau.
"""
import glob
import json
import math
import os
import sys

for folder in sys.argv[1:]:
    print(f"{folder}\n{'member':<13}{'seed':>4}{'iter 0':>8}{'250':>7}{'500':>7}{'1000':>7}"
          f"{'lowest at':>10}{'left plateau':>13}  flags")
    runs = []
    for path in glob.glob(os.path.join(folder, "*", "seed*", "results.json")):
        with open(path) as f:
            runs.append(json.load(f))
    for r in sorted(runs, key=lambda r: (r["objective"], r["seed"])):
        curve = r["train"]["curve"]
        loss = {point["iter"]: point["val_loss"] for point in curve}
        flags = []
        if not all(math.isfinite(v) for v in loss.values()):
            flags.append("not finite")
        if abs(loss[0] - math.log(151)) > 0.3:  # the built-in corpus: 150 tokens and <eos>
            flags.append(f"init {loss[0]:.2f}, ln V {math.log(151):.2f}")
        rises = [b["iter"] for a, b in zip(curve, curve[1:])
                 if b["val_loss"] > a["val_loss"] + 0.02]
        if rises:
            more = f" and {len(rises) - 1} more" if len(rises) > 1 else ""
            flags.append(f"rises at {rises[0]}{more}")
        if r["train"]["plateau_exit_iter"] is None:
            flags.append("never left the plateau")
        cells = "".join(f"{loss.get(i, float('nan')):>7.2f}" for i in (250, 500, 1000))
        lowest = min(loss, key=loss.get)
        print(f"{r['objective']:<13}{r['seed']:>4}{loss[0]:>8.2f}{cells}{lowest:>10}"
              f"{str(r['train']['plateau_exit_iter']):>13}  {'; '.join(flags) or '-'}")
