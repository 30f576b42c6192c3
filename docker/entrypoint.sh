#!/bin/sh
# Entry point of the runtime image; CI runs it on the host too (tests/test_docker.py), with
# TensorRT-RTX standing in for the image's TensorRT.
#
# 1. For every ONNX file in $VITSLIM_MODELS, an engine in $VITSLIM_ENGINES: built on this GPU, or
#    copied from $VITSLIM_ENGINE_CACHE when one was built before for the same ONNX bytes,
#    TensorRT version, GPU, precision and profiles (vitslim build --cache); $VITSLIM_BUILD_ARGS
#    are passed to every build (e.g. "--batch 1:8:32").
# 2. Then the command: vitslim "$@" (default: selftest --prepared /opt/selftest).
set -eu
vitslim="${VITSLIM_PYTHON:-python3} -m vitslim"
models="${VITSLIM_MODELS:-/models}"
engines="${VITSLIM_ENGINES:-/engines}"
cache="${VITSLIM_ENGINE_CACHE:-/cache}"
if [ -d "$models" ]; then
    for onnx in "$models"/*.onnx; do
        [ -e "$onnx" ] || continue
        name=$(basename "$onnx" .onnx)
        # shellcheck disable=SC2086  # VITSLIM_BUILD_ARGS is a list of flags
        $vitslim build "$onnx" --cache "$cache" --out "$engines/$name.engine" ${VITSLIM_BUILD_ARGS:-}
    done
fi
# shellcheck disable=SC2086  # $vitslim is a command and its module flag
exec $vitslim "$@"
