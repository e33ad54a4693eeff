#!/usr/bin/env bash
# Builds the llama.cpp peer that `treespec bench --peer llama.cpp` and
# `treespec bench forward --peer llama.cpp` measure against, in the same run.
#
# The source is the llama.cpp tree that the llama-cpp-python sdist vendors
# (a registry package, pinned below), so the peer is reproducible without any
# network but the package registries. The build is a plain CPU Release with
# GGML_NATIVE (llama.cpp's own default: it tunes for the host it runs on, as a
# user building it would); it is cached under $TREESPEC_HOME/peers/ and the
# script is idempotent: a second run only prints the paths.
#
# A native build only runs on CPUs with the build host's instruction sets,
# and the same image lands on different hosts (an AVX2-only EPYC one day, an
# AVX-512 / AMX Xeon the next): each build goes to build-<key>, the key being
# the host's SIMD features (the same list `treespec bench --peer` computes),
# so a cached build is never run on a CPU that lacks its instructions.
#
# Output (stdout, one `key=value` a line, for scripts and for humans):
#   llama_cpp_version=…  llama_cpp_commit=…  llama_server=PATH  llama_bench=PATH
#   llama_batched_bench=PATH  llama_cli=PATH  llama_completion=PATH (if built)
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
HOME_DIR="${TREESPEC_HOME:-$HOME/.cache/treespec}"
ROOT="$HOME_DIR/peers/llama.cpp-py$VERSION"
SRC="$ROOT/src"
# The SIMD features a native build depends on, in a fixed order; keep in
# step with `host_key` in src/bench/llama_cpp.rs.
host_key() {
    local flags key="" f
    flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
    for f in avx2 avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_tile avx_vnni; do
        if [[ " ${flags#*:} " == *" $f "* ]]; then key+="${key:+-}$f"; fi
    done
    echo "${key:-$(uname -m)}"
}
BUILD="$ROOT/build-$(host_key)"
JOBS="${JOBS:-$(nproc)}"
TARGETS=(llama-server llama-bench llama-batched-bench llama-cli llama-completion)

log() { echo "[llama_cpp.sh] $*" >&2; }

need_tool() {
    local tool=$1 pkg=$2
    if ! command -v "$tool" >/dev/null 2>&1; then
        command -v apt-get >/dev/null 2>&1 || { log "$tool missing and no apt-get"; exit 1; }
        log "installing $pkg"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq "$pkg" >&2
    fi
}

print_paths() {
    echo "llama_cpp_version=$VERSION"
    echo "llama_cpp_commit=$(cat "$ROOT/COMMIT" 2>/dev/null || echo unknown)"
    echo "llama_cpp_build=$BUILD"
    local t
    for t in "${TARGETS[@]}"; do
        if [[ " ${NOAMX_TARGETS[*]} " == *" $t "* ]] && [ -n "$SERVER_BUILD" ] && [ -x "$SERVER_BUILD/bin/$t" ]; then
            echo "${t//-/_}=$SERVER_BUILD/bin/$t"
        elif [ -x "$BUILD/bin/$t" ]; then
            echo "${t//-/_}=$BUILD/bin/$t"
        fi
    done
}

# The batched tools without AMX, on AMX hosts: on an AMX Xeon (Sapphire
# Rapids VM, 2026-12-04) llama-server and llama-batched-bench of this release
# segfault in ggml_backend_amx_mul_mat as soon as a batch has more than one
# row (gdb backtrace), while llama-bench's one-row tg runs, on the 0.5B faster
# with AMX (tg8 35.3 tok/s against 28.0 without; the 1.5B 16.0 against 17.0).
# `--no-repack` avoids the crash but also drops the AVX-512 weight repacking.
# So the native build (AMX included, as a user's) serves llama-bench and the
# CLIs, and a second native-minus-AMX build of llama-server and
# llama-batched-bench goes to $BUILD-noamx, which the Rust side prefers for
# those two when it exists (src/bench/llama_cpp.rs). BUILT records the
# recipe; a build made by another recipe is rebuilt.
RECIPE="native-2"
SERVER_BUILD=""
NOAMX_TARGETS=(llama-server llama-batched-bench)
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
    SERVER_BUILD="$BUILD-noamx"
fi
server_ready() {
    [ -z "$SERVER_BUILD" ] ||
        { [ "$(cat "$SERVER_BUILD/BUILT" 2>/dev/null)" = "$RECIPE" ] && [ -x "$SERVER_BUILD/bin/llama-batched-bench" ]; }
}

if [ "$(cat "$BUILD/BUILT" 2>/dev/null)" = "$RECIPE" ] && [ -x "$BUILD/bin/llama-server" ] && server_ready; then
    print_paths
    exit 0
fi

need_tool cmake cmake
need_tool g++ g++
need_tool make make
mkdir -p "$ROOT"

if [ ! -f "$SRC/CMakeLists.txt" ]; then
    DL="$ROOT/download"
    rm -rf "$DL" && mkdir -p "$DL"
    log "fetching the llama-cpp-python $VERSION sdist"
    # --no-binary for this one package only: ':all:' would also build its
    # build dependencies (scikit-build-core, cmake, ...) from source.
    # pip prepares the sdist's metadata in an isolated build env (it fetches
    # scikit-build-core for that); nothing is compiled by this step.
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        -d "$DL" "llama-cpp-python==$VERSION" >&2
    tarball=""
    for f in "$DL"/llama_cpp_python-*.tar.gz "$DL"/llama-cpp-python-*.tar.gz; do
        [ -f "$f" ] && tarball=$f && break
    done
    [ -n "$tarball" ] || { log "no sdist downloaded"; exit 1; }
    tar -xzf "$tarball" -C "$DL"
    vendored=$(find "$DL" -maxdepth 3 -type d -path '*vendor/llama.cpp' -print -quit)
    [ -n "$vendored" ] && [ -f "$vendored/CMakeLists.txt" ] ||
        { log "the sdist has no vendor/llama.cpp"; exit 1; }
    rm -rf "$SRC"
    mv "$vendored" "$SRC"
    # The sdist carries no .git and its build-info is a template, so the
    # pinned package version is what identifies this llama.cpp tree.
    echo "vendored-by-llama-cpp-python-$VERSION" >"$ROOT/COMMIT"
    rm -rf "$DL"
fi

log "configuring (CPU, Release) in $BUILD"
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
built=()
for t in "${TARGETS[@]}"; do
    # Older trees have no llama-completion (newer ones split it from llama-cli).
    if cmake --build "$BUILD" --config Release -j "$JOBS" --target "$t" >&2; then
        built+=("$t")
    else
        log "target $t not built (absent in this llama.cpp?)"
    fi
done
[ -x "$BUILD/bin/llama-server" ] || { log "llama-server did not build"; exit 1; }
echo "$RECIPE" > "$BUILD/BUILT"
if [ -n "$SERVER_BUILD" ] && ! server_ready; then
    # GCC gives explicit -mno-* precedence over what -march=native implies.
    NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    log "configuring ${NOAMX_TARGETS[*]} without AMX in $SERVER_BUILD"
    cmake -S "$SRC" -B "$SERVER_BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DCMAKE_C_FLAGS="$NOAMX" -DCMAKE_CXX_FLAGS="$NOAMX" \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON \
        -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
    for t in "${NOAMX_TARGETS[@]}"; do
        cmake --build "$SERVER_BUILD" --config Release -j "$JOBS" --target "$t" >&2
        [ -x "$SERVER_BUILD/bin/$t" ] || { log "$t (no AMX) did not build"; exit 1; }
    done
    echo "$RECIPE" > "$SERVER_BUILD/BUILT"
fi
print_paths
