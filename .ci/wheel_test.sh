#!/usr/bin/env bash
# Wheel test: install compressdrop the way users do (a built wheel, not editable) into a fresh
# virtual environment and run, from outside the source tree, `compressdrop recipes list` and the
# README's main job on digits cut to one epoch per stage. It catches files missing from the wheel
# (the shipped recipes are package data). Run by `make test` (and so by CI), or alone:
# `make wheel-test`.
#
# Environment: PY (the interpreter for the fresh venv, default python3), TORCH (default
# torch==2.13.0, the CPU build on this project's machines; a bare `torch` would pull a CUDA build),
# KEEP=1 keeps the temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
PY=${PY:-python3}
TORCH=${TORCH:-torch==2.13.0}
PIP_FLAGS=(-q --disable-pip-version-check)
# pip's notes on this machine's missing local index folders, one per package: noise, not errors.
quiet() { { "$@" 2>&1; } | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/compressdrop-wheel.XXXXXX")
if [[ ${KEEP:-0} == 1 ]]; then
    echo "wheel-test: keeping $TMP"
else
    trap 'rm -rf "$TMP"' EXIT
fi
step() { printf 'wheel-test [%3ds] %s\n' "$SECONDS" "$*"; }

# 1. Build the wheel from a copy of the files git sees (tracked, and untracked but not ignored),
#    so that stale build/ or *.egg-info folders in the working tree cannot leak into it and the
#    build writes nothing there. The build backend is the dev venv's setuptools (no isolation, no
#    network), falling back to PY's.
step "building the wheel"
mkdir "$TMP/src" "$TMP/dist"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf - | tar -xf - -C "$TMP/src"
else  # an unpacked source archive: everything but environments and build outputs
    tar --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
        --exclude=./runs --exclude=__pycache__ -cf - . | tar -xf - -C "$TMP/src"
fi
BUILD_PY=$SRC/.venv/bin/python
[[ -x $BUILD_PY ]] || BUILD_PY=$PY
(cd "$TMP/src" && quiet "$BUILD_PY" -m pip wheel "${PIP_FLAGS[@]}" --no-deps --no-build-isolation \
    -w "$TMP/dist" .)
WHEEL=$(ls "$TMP"/dist/compressdrop-*.whl)
step "built $(basename "$WHEEL")"
"$BUILD_PY" - "$WHEEL" <<'EOF'
import sys, zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
recipes = [n for n in names if n.startswith("compressdrop/recipes/shipped/") and n.endswith(".yaml")]
assert "compressdrop/recipes/shipped/lenet300-lognormal.yaml" in recipes, recipes
print(f"wheel-test: the wheel has {len(recipes)} shipped recipes")
EOF

# 2. A fresh venv with the pinned torch and the wheel (its other dependencies from the index).
step "installing $TORCH and the wheel into a fresh venv"
"$PY" -m venv "$TMP/venv"
BIN=$TMP/venv/bin
# --no-compile: byte-compiling torch's thousands of files would cost more than the rest together.
quiet "$BIN/pip" install "${PIP_FLAGS[@]}" --no-compile "$TORCH" "$WHEEL"

# 3. Run from a directory outside the source tree, so only the installed package can be imported.
mkdir "$TMP/work"
cd "$TMP/work"
unset PYTHONPATH
where=$("$BIN/python" -c "import compressdrop; print(compressdrop.__file__)")
site=$("$BIN/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
step "compressdrop imports from $where"
[[ $where == "$site"/compressdrop/* ]] || { echo "wheel-test: not the installed copy: $where" >&2; exit 1; }

step "compressdrop recipes list"
"$BIN/compressdrop" recipes list | tee recipes.txt
grep -q '^lenet300-lognormal ' recipes.txt || { echo "wheel-test: lenet300-lognormal not listed" >&2; exit 1; }

# The README's main job (`compressdrop train --recipe lenet300-lognormal --data digits`), with the
# shipped recipe cut to one epoch per stage.
"$BIN/compressdrop" recipes show lenet300-lognormal >shipped.yaml
"$BIN/python" - shipped.yaml short.yaml <<'EOF'
import sys

import yaml

recipe = yaml.safe_load(open(sys.argv[1]))
for stage in recipe["stages"].values():
    stage["epochs"] = 1
yaml.safe_dump(recipe, open(sys.argv[2], "w"), sort_keys=False)
EOF
step "compressdrop train --recipe short.yaml --data digits --out run"
"$BIN/compressdrop" train --recipe short.yaml --data digits --out run
[[ -s run/slim.onnx ]] || { echo "wheel-test: run/slim.onnx missing" >&2; exit 1; }
step "ok: run/slim.onnx written by the installed wheel"
