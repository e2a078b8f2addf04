# Sourced by the bench scripts after `cd` to the repository root. `need_ptb SCRIPT FILE...`
# sets $ptb to where PTB is read from (PTB_DIR, default ../shared/corpora/ptb: PTB is never
# copied into the repository), fails naming the first FILE missing there, then builds textvae
# and puts its venv on the path.
need_ptb() {
  find_ptb "$@"
  scripts/setup
  source scripts/env.sh
}

# `find_ptb SCRIPT FILE...`: need_ptb without the build, for a machine given a built binary.
find_ptb() {
  local script=$1
  shift
  ptb="${PTB_DIR:-../shared/corpora/ptb}"
  local f
  for f in "$@"; do
    [ -f "$ptb/$f" ] || { echo "bench/$script: $ptb/$f not found (set PTB_DIR)" >&2; exit 1; }
  done
}

# `build_base COMMIT DIR`: textvae of COMMIT built in a worktree at DIR (once; a few minutes),
# for the scripts that run an earlier build beside this one.
build_base() {
  local commit=$1 wt=$2
  if [ ! -x "$wt/target/release/textvae" ] || [ "$(git -C "$wt" rev-parse HEAD 2>/dev/null)" != "$(git rev-parse "$commit")" ]; then
    rm -rf "$wt"; git worktree prune
    git worktree add --detach "$wt" "$commit" >/dev/null
    (cd "$wt" && cargo build --release --locked >&2)
  fi
}
