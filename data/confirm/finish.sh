#!/usr/bin/env bash
# finish.sh: read the finished study back, once, and write everything the README's results quote.
# It refuses while any of the 144 runs is missing here (a study command would train what it lacks).
# It writes, in data/confirm/: the three commands' summaries by today's lookaround.py
# (--accept_code_change, as the runs are 70a897f's): main/summary.json and .png, main/dose.json and
# .png, data300/summary.json and .png; and reading.txt: the commands' output, how 70a897f's own reading
# of the same runs differs from it, the independent check of the primary rows (end of training, lowest
# val loss), every run's curve and the Markdown tables. The figures go to assets/confirm.png and
# assets/data300.png.
set -eo pipefail  # a failing step inside the reading.txt block stops it too
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
C=$REPO/data/confirm
S=~/lookaround-studies/confirm
PROTOCOL=70a897f
SHA=e3753524e0d0b67658acf8ce01addc1e00ea9029f3dad2c191945d77cc42d57f
git -C "$REPO" diff --quiet HEAD -- lookaround.py || { echo "lookaround.py differs from HEAD: commit it first"; exit 1; }
python3 - "$C" <<'PY'
import os, sys
import matplotlib  # noqa: F401 (the summaries draw their figures only where it is installed)
import torch
if torch.__version__ != "2.13.0+cpu":  # a run's runtime is one of its settings
    sys.exit(f"torch {torch.__version__}: the study's runs were made by 2.13.0+cpu; install that")
C = sys.argv[1]
sys.path.insert(0, C)
from tables import COMMANDS  # each command's arm, members and seeds
want = [f"{'data300' if arm == 'data300' else 'main'}/{m}/seed{s}"
        for arm, (_, members, seeds) in COMMANDS.items() for m in members for s in seeds]
missing = [w for w in want if not os.path.exists(f"{C}/{w}/results.json")]
if missing:
    sys.exit(f"{len(missing)} of {len(want)} runs are not in {C} yet (first: {missing[0]}): "
             "let the study finish and run persist.sh")
print(f"all {len(want)} runs are in {C}")
PY
mkdir -p "$S"
[ -d "$S/code" ] || git -C "$REPO" worktree add --detach "$S/code" $PROTOCOL
[ "$(sha256sum "$S/code/lookaround.py" | cut -d' ' -f1)" = $SHA ] || { echo "$S/code is not $PROTOCOL"; exit 1; }

study() {  # the README's three commands on the CPU: study MAIN_DIR DATA300_DIR [more flags]
  local m=$1 d=$2; shift 2
  set -- --device cpu "$@"
  python3 lookaround.py --objective all --variants mlm_half,varlen_bert --seeds 9-24 --out_dir "$m" "$@"
  python3 lookaround.py --objective ar --variants ar_diverse,ar_diverse2,ar_diverse8 --seeds 9-16 \
    --summary_name dose --out_dir "$m" "$@"
  python3 lookaround.py --objective all --seeds 9-16 --train_docs 300 --finetune_labels 32,128 \
    --compare_to "$m" --out_dir "$d" "$@"
}

# 70a897f's reading, on a copy of the runs (its summaries stay out of data/confirm)
P=$S/reading_at_protocol
rm -rf "$P" && mkdir -p "$P"
cp -r "$C/main" "$C/data300" "$P/"
(cd "$S/code" && study "$P/main" "$P/data300") > "$S/protocol.txt"
# today's reading, the one the README quotes
(cd "$REPO" && study "$C/main" "$C/data300" --accept_code_change) > "$S/today.txt"
same() { sed -e "s#$2#DIR#g" -e 's/trained in [0-9:]*/trained in T/' "$1"; }  # folders and clock
{
  echo "# data/confirm/reading.txt: written by finish.sh at $(git -C "$REPO" rev-parse --short HEAD)"
  echo "## The three commands, by today's lookaround.py (--accept_code_change)"
  sed "s#$REPO/##g" "$S/today.txt"
  echo "## How 70a897f's output for the same runs differs (diff -w today 70a897f; folders renamed)"
  # -w: today's claim table sizes its name column to the longest name (70a897f's ran long names
  # into the next column), which alone would change every row
  diff -w <(same "$S/today.txt" "$C") <(same "$S/protocol.txt" "$P") || true
  echo "## check_primary.py, end of training"
  python3 "$C/check_primary.py" "$C/main"
  echo "## check_primary.py, lowest val loss"
  python3 "$C/check_primary.py" "$C/main" --best
  echo "## curves.py"
  python3 "$C/curves.py" "$C/main" "$C/data300"
  echo "## tables.py"
  python3 "$C/tables.py" "$C"
} | sed "s#$REPO/##g" > "$C/reading.txt"
cp "$C/main/summary.png" "$REPO/assets/confirm.png"
cp "$C/data300/summary.png" "$REPO/assets/data300.png"
echo "wrote $C/reading.txt, assets/confirm.png and assets/data300.png"
