#!/usr/bin/env bash
# The kill harness of tests/cli.rs, longer: `textvae train` SIGKILLed at KILLS (default 200)
# seeded random moments — starting, training, saving — each time checked to load, to generate,
# to resume from its last save, and to keep no step twice in its metrics; then SIGTERM.
#
#   bench/kills.sh [KILLS]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup
source scripts/env.sh
TEXTVAE_KILLS="${1:-200}" cargo test --release --locked --test cli -- --nocapture \
  killed_at_random_moments_the_run_always_resumes_from_its_last_save 2>&1 | grep -E "kills:|test result|panicked"
