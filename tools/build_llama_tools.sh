#!/usr/bin/env bash
# Builds llama.cpp's llama-quantize and llama-imatrix from the sources vendored in the llama-cpp-python sdist of
# the installed llama-cpp-python version, with the CMAKE flags of .ci/run (no native/AMX kernels), and caches
# them under ~/.cache/gemma2-convert/llama-tools/<version>/bin. Prints the bin directory.
# A second run with the binaries present does nothing. The tests that compare with these tools find them there
# (gemma2_convert/pipeline/llama_runner.py: llama_tools_dir).
set -euo pipefail
version=$(python -c "import llama_cpp; print(llama_cpp.__version__)")
root=$HOME/.cache/gemma2-convert/llama-tools
dest="$root/$version"
if [[ -x "$dest/bin/llama-quantize" && -x "$dest/bin/llama-imatrix" ]]; then
    echo "$dest/bin"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$work/build" --config Release -j "$(nproc)" --target llama-quantize llama-imatrix >&2
mkdir -p "$dest.tmp/bin"
cp "$work/build/bin/llama-quantize" "$work/build/bin/llama-imatrix" "$dest.tmp/bin/"
rm -rf "$dest"; mv "$dest.tmp" "$dest"
echo "$dest/bin"
