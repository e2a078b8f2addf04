# Sourced by the other scripts: where the libtorch venv lives and how tch finds it.
# TEXTVAE_VENV overrides the location (default ~/.cache/textvae/venv, outside the clone so that
# it survives fresh clones and CI runs).
TEXTVAE_TORCH_VERSION=2.13.0
TEXTVAE_VENV="${TEXTVAE_VENV:-$HOME/.cache/textvae/venv}"
export VIRTUAL_ENV="$TEXTVAE_VENV"
export PATH="$TEXTVAE_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
