#!/usr/bin/env bash
# resume.sh: go on with the study on a machine that kept nothing: a worktree of the protocol commit,
# the runs committed here copied in, every job whose runs are all there marked done, and one worker
# per core started (worker.sh). Safe to rerun: it copies no file over one already there and starts
# no worker while one runs.
set -e
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
S=~/lookaround-studies/confirm
PROTOCOL=70a897f
SHA=e3753524e0d0b67658acf8ce01addc1e00ea9029f3dad2c191945d77cc42d57f
mkdir -p $S/claims $S/logs
[ -d $S/code ] || git -C "$REPO" worktree add --detach $S/code $PROTOCOL
[ "$(sha256sum $S/code/lookaround.py | cut -d' ' -f1)" = $SHA ] || { echo "$S/code is not $PROTOCOL"; exit 1; }
for arm in main data300; do
  [ -d "$REPO/data/confirm/$arm" ] && cp -rn "$REPO/data/confirm/$arm" $S/
done
cp "$REPO/data/confirm/jobs.txt" "$REPO/data/confirm/worker.sh" $S/
chmod +x $S/worker.sh
python3 - "$S" <<'PY'
import os, sys
S = sys.argv[1]
for line in open(f"{S}/jobs.txt"):
    name, _, flags = line.strip().split("|")
    words = flags.split()
    flag = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}
    members = [flag["--objective"]] + flag.get("--variants", "").split(",")
    lo, _, hi = flag["--seeds"].partition("-")
    seeds = range(int(lo), int(hi or lo) + 1)
    paths = [f"{flag['--out_dir']}/{m}/seed{s}/results.json" for m in members if m for s in seeds]
    if all(os.path.exists(p) for p in paths):
        open(f"{S}/claims/{name}.done", "a").close()
PY
echo "done: $(ls $S/claims | grep -c '\.done$') of $(wc -l < $S/jobs.txt) jobs"
if pgrep -f "confirm/worker.sh" > /dev/null; then
  echo "workers already running"
else
  cd ~ && for core in 0 1; do nohup $S/worker.sh $core > /dev/null 2>&1 & done
  echo "started two workers; progress: $S/logs/worker.log"
fi
