#!/usr/bin/env bash
# Regenerates the Go code for proto/ (buf + protoc-gen-go + protoc-gen-connect-go,
# pinned versions, local plugins, no network registry).
#   scripts/proto.sh           regenerate proto/gen
#   scripts/proto.sh --check   fail if the committed proto/gen is stale
set -euo pipefail
cd "$(dirname "$0")/.."
BUF_VERSION=v1.75.0
PROTOC_GEN_GO_VERSION=v1.36.11
PROTOC_GEN_CONNECT_GO_VERSION=v1.21.1
bin="$(go env GOPATH)/bin"
export PATH="$bin:$PATH"

need() { # need TOOL MODULE VERSION
  if ! command -v "$1" >/dev/null 2>&1 || ! "$1" --version 2>/dev/null | grep -q "${3#v}"; then
    echo "installing $2@$3" >&2
    go install "$2@$3"
  fi
}
need buf github.com/bufbuild/buf/cmd/buf "$BUF_VERSION"
need protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go "$PROTOC_GEN_GO_VERSION"
need protoc-gen-connect-go connectrpc.com/connect/cmd/protoc-gen-connect-go "$PROTOC_GEN_CONNECT_GO_VERSION"

if [ "${1:-}" = "--check" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  cp -r proto "$tmp/proto"
  rm -rf "$tmp/proto/gen"
  (cd "$tmp/proto" && buf lint && buf generate)
  if ! diff -r proto/gen "$tmp/proto/gen" >/dev/null; then
    diff -r proto/gen "$tmp/proto/gen" | head -40 >&2
    echo "proto/gen is stale: run scripts/proto.sh and commit the result" >&2
    exit 1
  fi
  echo "proto/gen is up to date"
  exit 0
fi
cd proto
buf lint
rm -rf gen
buf generate
echo "generated proto/gen"
