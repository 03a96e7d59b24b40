#!/usr/bin/env bash
# A real S3-protocol server on 127.0.0.1 for the tests: moto's standalone server, installed from the
# package registry into a cached virtual environment on first use.
#
#   scripts/s3-server.sh install        # create the environment (idempotent; quick when present)
#   scripts/s3-server.sh serve PORT     # run the server in the foreground on 127.0.0.1:PORT
#
# CONALA_TOOLS_DIR (default ~/.cache/conala-tools) holds the environment. S3_UPLOAD_PART_MIN_SIZE is
# passed through to moto (5 MiB by default, as on AWS; the tests lower it to exercise multipart
# uploads with small parts).
set -euo pipefail
MOTO_VERSION=5.2.5
TOOLS="${CONALA_TOOLS_DIR:-$HOME/.cache/conala-tools}"
VENV="$TOOLS/moto-$MOTO_VERSION"

install() {
    if [ -f "$VENV/.complete" ]; then
        return
    fi
    mkdir -p "$TOOLS"
    # One installer at a time (tests start servers in parallel); `.complete` marks a finished one, so
    # an interrupted install is redone rather than used half-made.
    exec 9>"$TOOLS/moto.lock"
    flock 9
    if [ ! -f "$VENV/.complete" ]; then
        rm -rf "$VENV"
        python3 -m venv "$VENV" >&2
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2
        touch "$VENV/.complete"
    fi
    flock -u 9
}

case "${1:-}" in
    install) install ;;
    serve)
        install
        exec "$VENV/bin/moto_server" -H 127.0.0.1 -p "${2:?usage: s3-server.sh serve PORT}"
        ;;
    *)
        echo "usage: $0 install | serve PORT" >&2
        exit 2
        ;;
esac
