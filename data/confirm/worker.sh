#!/usr/bin/env bash
# worker.sh CORE: take the next unclaimed job from jobs.txt (claim = mkdir, atomic), run it pinned to CORE.
# A job is done when its command exits 0 (claims/NAME.done), failed otherwise (NAME.failed, not retried);
# a job with a dependency waits until that job is done.
S=~/lookaround-studies/confirm
CORE=$1
cd $S/code
while true; do
  pending=0; took=0
  while IFS='|' read -r name dep flags; do
    [ -f $S/claims/$name.done ] && continue
    [ -f $S/claims/$name.failed ] && continue
    pending=1
    [ -n "$dep" ] && [ ! -f $S/claims/$dep.done ] && continue
    mkdir $S/claims/$name.lock 2>/dev/null || continue
    echo "$(date -u +%FT%TZ) core $CORE starts $name" >> $S/logs/worker.log
    taskset -c $CORE python3 lookaround.py $flags >> $S/logs/$name.log 2>&1
    rc=$?
    echo "$(date -u +%FT%TZ) core $CORE ends $name rc=$rc" >> $S/logs/worker.log
    if [ $rc -eq 0 ]; then touch $S/claims/$name.done; else touch $S/claims/$name.failed; fi
    rmdir $S/claims/$name.lock
    took=1
    break
  done < $S/jobs.txt
  [ $pending -eq 0 ] && exit 0
  [ $took -eq 0 ] && sleep 60
done
