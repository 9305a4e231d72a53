#!/usr/bin/env bash
# `make image`: build docker/runtime.Dockerfile for real, offline, and run a pipeline in the image.
#
#   docker/build_and_check.sh                        the whole thing (below)
#   docker/build_and_check.sh requirements           write docker/requirements-runtime.txt from uv.lock
#   docker/build_and_check.sh requirements --check   fail if that file differs from uv.lock's export
#
# No registry can be reached from here, so rayproject/ray is replaced by a stand-in made on this machine:
#   1. docker/requirements-runtime.txt  <- `uv export` of uv.lock (runtime, embedded, s3, tau2 extras, hashes)
#   2. a wheelhouse for it (wheels and one sdist), downloaded on the host by pip in a Python 3.11 venv (cp311 manylinux wheels;
#      the stand-in's Python is Debian 12's 3.11.2, the host's 3.11.7: same ABI, so the wheels fit)
#   3. localhost/matrix-debian:bookworm  <- debootstrap --variant=minbase from the host's Debian mirror
#   4. localhost/matrix-base:ray<ver>-py311  <- docker/standin-base.Dockerfile (user ray, venv, Ray
#      from the wheelhouse): the part rayproject/ray plays
#   5. localhost/matrix-runtime:<version>  <- docker/runtime.Dockerfile with --network=none and
#      --build-arg BASE_IMAGE=<the stand-in>; the wheelhouse sits in the context's wheels/ folder
#   6. in that image: `matrix --help`, then `matrix run prefilter` over the bundled corpus with a local
#      Ray inside the container; checks exit 0, _SUCCESS and the manifest's row counts.
# Steps 2-4 are cached (MATRIX_IMAGE_CACHE, podman's store) and skipped when warm; MATRIX_IMAGE_REBUILD=1
# rebuilds the Debian and stand-in images. podman runs with runc and a lowered nofile limit, the only
# way it works on these machines.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
UV=${UV:-$(command -v uv || echo "$(cd "$(dirname "$0")/.." && pwd)/.tools/bin/uv")}  # as the Makefile finds it
REQS=${MATRIX_REQS:-docker/requirements-runtime.txt} # MATRIX_REQS: for the test of --check itself

export_requirements() {
    # The one definition of the image's locked set; tests/test_docker.py runs it with --check.
    "$UV" export --frozen --no-dev --extra runtime --extra embedded --extra s3 --extra tau2 --no-emit-project \
        --format requirements-txt
}

if [[ "${1:-}" == requirements ]]; then
    if [[ "${2:-}" == --check ]]; then
        if ! diff -u "$REQS" <(export_requirements) >&2; then
            echo "$REQS is not uv.lock's export: run docker/build_and_check.sh requirements" >&2
            exit 1
        fi
    else
        export_requirements >"$REQS"
    fi
    exit 0
fi

CACHE=${MATRIX_IMAGE_CACHE:-$HOME/.cache/matrix-image}
PY=${PY:-$ROOT/.venv/bin/python}
PIP_PY=$CACHE/pip-venv/bin/python # a Python 3.11 with pip (uv's venvs have none), for the wheelhouse
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit nofile=16384:16384 --ulimit nproc=32768:32768)
DEBIAN_IMAGE=localhost/matrix-debian:bookworm
VERSION=$("$PY" -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
RAY_VERSION=$(sed -n 's/^ray==\([^ ]*\).*/\1/p' "$REQS")
BASE_IMAGE=localhost/matrix-base:ray$RAY_VERSION-py311
RUNTIME_IMAGE=localhost/matrix-runtime:$VERSION
mkdir -p "$CACHE"
t0=$SECONDS
step() { printf '\n== [%4ss] %s\n' "$((SECONDS - t0))" "$*"; }

step "tools: podman, buildah, runc, debootstrap"
missing=()
for tool in podman buildah runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    apt-get -o DPkg::Lock::Timeout=600 update -q
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "${missing[@]}"
fi

step "1. $REQS from uv.lock"
before=$(sha256sum "$REQS" 2>/dev/null || true)
export_requirements >"$REQS"
[[ "$before" == "$(sha256sum "$REQS")" ]] || echo "note: $REQS changed (uv.lock moved on): commit it"

step "2. wheelhouse for the lock"
lock_id=$(sha256sum "$REQS" | cut -c1-16)
WHEELHOUSE=$CACHE/wheelhouse-$lock_id
if [[ ! -f "$WHEELHOUSE/.complete" ]]; then
    rm -rf "$CACHE"/wheelhouse-*
    [[ -x "$PIP_PY" ]] || "$UV" venv --quiet --seed --python 3.11 "$CACHE/pip-venv"
    # --no-deps: the export is the whole closure; --require-hashes: every file matches uv.lock's hash.
    # antlr4-python3-runtime (hydra's parser runtime) ships only an sdist: it stays an sdist, as on PyPI
    # (a wheel built here would not match the lock's hash), and the image builds it with setuptools and
    # wheel, which pip's build isolation then finds in the wheelhouse too.
    setuptools=$(sed -n 's/^setuptools==\([^ ]*\).*/\1/p' "$REQS")
    { nice -n 10 "$PIP_PY" -m pip download --no-deps --require-hashes -r "$REQS" -d "$WHEELHOUSE" &&
        "$PIP_PY" -m pip download --no-deps "setuptools==${setuptools:-84.2.1}" "wheel==0.48.0" -d "$WHEELHOUSE"; } \
        >"$CACHE/pip-download.log" 2>&1 ||
        { grep -v "^WARNING: Location" "$CACHE/pip-download.log" | tail -20; exit 1; }
    touch "$WHEELHOUSE/.complete"
fi
echo "$(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(find "$WHEELHOUSE" -name '*.tar.gz' | wc -l) sdist in $WHEELHOUSE"

step "build context: requirements, wheelhouse and the project's wheel"
CONTEXT=$CACHE/context
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT/wheels"
cp "$REQS" "$CONTEXT/"
cp -l "$WHEELHOUSE"/*.whl "$WHEELHOUSE"/*.tar.gz "$CONTEXT/wheels/"
"$UV" build --quiet --wheel --out-dir "$CONTEXT/wheels" .
ls "$CONTEXT/wheels/matrix_provider-$VERSION-py3-none-any.whl"

step "3. $DEBIAN_IMAGE (debootstrap)"
if [[ "${MATRIX_IMAGE_REBUILD:-0}" == 1 ]] || ! "${PODMAN[@]}" image exists "$DEBIAN_IMAGE"; then
    # Debian 12, the hosts' own release, and the one whose python3 is 3.11 like rayproject/ray:*-py311
    # and the project's venv (Debian 13 has 3.13): the cp311 wheels of the wheelhouse fit it.
    codename=bookworm
    mirror=${MATRIX_DEBIAN_MIRROR:-$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | awk 'NR == 1 {print $2}' || true)}
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs=$CACHE/rootfs-$codename
    rm -rf "$rootfs"
    nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1 \
        "$codename" "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 ||
        { tail -20 "$CACHE/debootstrap.log"; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "${PODMAN[@]}" import --quiet - "$DEBIAN_IMAGE"
    rm -rf "$rootfs"
fi

step "4. $BASE_IMAGE (stand-in for rayproject/ray:$RAY_VERSION-py311)"
if [[ "${MATRIX_IMAGE_REBUILD:-0}" == 1 ]] || ! "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    nice -n 10 "${PODMAN[@]}" build --quiet --format docker --network=none "${LIMITS[@]}" -f docker/standin-base.Dockerfile \
        --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" --build-arg RAY_VERSION="$RAY_VERSION" \
        -t "$BASE_IMAGE" "$CONTEXT"
fi

step "5. $RUNTIME_IMAGE from docker/runtime.Dockerfile (offline)"
previous=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$RUNTIME_IMAGE" 2>/dev/null || true)
nice -n 10 "${PODMAN[@]}" build --format docker --network=none "${LIMITS[@]}" -f docker/runtime.Dockerfile \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg MATRIX_VERSION="$VERSION" \
    -t "$RUNTIME_IMAGE" "$CONTEXT"
current=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$RUNTIME_IMAGE")
if [[ -n "$previous" && "$previous" != "$current" ]]; then
    "${PODMAN[@]}" rmi "$previous" >/dev/null 2>&1 || true # the last build's image, now untagged
fi

step "6. matrix --help and matrix run prefilter inside the image"
"${PODMAN[@]}" run --rm --network=none "${LIMITS[@]}" "$RUNTIME_IMAGE" matrix --help >/dev/null
"${PODMAN[@]}" run --rm --network=none "${LIMITS[@]}" --shm-size=1g -e RAY_USAGE_STATS_ENABLED=0 \
    "$RUNTIME_IMAGE" bash -c '
set -euo pipefail
corpus=$(python -c "import matrix_provider, pathlib; print(pathlib.Path(matrix_provider.__file__).parent / \"data/corpus\")")
matrix run prefilter --input "$corpus" --output /tmp/out --quiet
test -f /tmp/out/_SUCCESS
python - <<PY
import json
m = json.load(open("/tmp/out/_manifest.json"))
counts = {k: m[k] for k in ("rows_in", "rows_out", "rows_ok", "rows_filtered", "rows_error")}
assert m["rows_in"] > 0 and m["rows_in"] == m["rows_out"], counts
print("prefilter in the container:", counts)
PY'
step "done: $RUNTIME_IMAGE built offline on $BASE_IMAGE; a pipeline ran in it"
