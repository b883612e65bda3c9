#!/usr/bin/env bash
# persist.sh: copy every finished run (results.json) and the untrained baselines from the study's
# folders into data/confirm/, and check that each records the protocol commit, unmodified.
set -e
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
S=~/lookaround-studies/confirm
cd $S
for arm in main data300; do
  [ -d $arm ] || continue
  find $arm -path "*/seed*/results.json" -o -path "$arm/untrained/*.json" | while read -r f; do
    mkdir -p "$REPO/data/confirm/$(dirname "$f")"
    cp "$f" "$REPO/data/confirm/$f"
  done
done
python3 - "$REPO/data/confirm" <<'PY'
import glob, json, sys
runs = sorted(glob.glob(f"{sys.argv[1]}/*/*/seed*/results.json"))
bad = [p for p in runs if (lambda c: (c["commit"][:7], c["modified"]) != ("70a897f", False))(
    json.load(open(p))["code"])]
print(f"{len(runs)} runs in data/confirm; not made by 70a897f unmodified: {bad or 'none'}")
sys.exit(1 if bad else 0)
PY
