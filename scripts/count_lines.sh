#!/bin/sh
# Non-blank (and all) lines of non-test Python per area at a revision: scripts/count_lines.sh [REV ...]
# (default HEAD). Same method for every revision: the .py files git tracks at REV outside tests/.
set -e
for rev in "${@:-HEAD}"; do
    git ls-tree -r --name-only "$rev" | grep '\.py$' | grep -v '^tests/' | while read -r f; do
        git show "$rev:$f" | awk -v f="$f" 'NF {n++} END {print f, n + 0, NR}'
    done | awk -v rev="$rev" '
        function add(area) { nb[area] += $2; all[area] += $3 }
        { split($1, p, "/"); add(p[1]); add("total")
          if ($1 ~ /^engine\/(loader|registry)\.py$/) add("loading: engine/{loader,registry}.py")
          if ($1 ~ /^engine\/parallel\/(checkpoint|loading)\.py$/) add("loading: engine/parallel/{checkpoint,loading}.py")
          if ($1 ~ /^engine\/families\//) add("loading: engine/families/")
          if ($1 ~ /^engine\/hf_experts\.py$/) add("loading: engine/hf_experts.py")
          if ($1 ~ /^(engine\/(loader|registry|hf_experts)\.py|engine\/families\/|engine\/parallel\/(checkpoint|loading)\.py|foundation\/)/)
              add("loading: all (the four above and foundation/)") }
        END { printf "%s\n%9s %9s  area\n", rev, "non-blank", "all"
              n = split("engine kernels merge foundation scripts total", order, " ")
              for (i = 1; i <= n; i++) printf "%9d %9d  %s\n", nb[order[i]], all[order[i]], order[i]
              for (a in nb) if (a ~ /^loading/) printf "%9d %9d  %s\n", nb[a], all[a], a | "sort -k3"; close("sort -k3") }'
done
