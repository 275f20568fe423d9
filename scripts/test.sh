#!/usr/bin/env bash
# The project's test command (the README's second command, and what CI runs).
# On a fresh Debian/Ubuntu machine it installs what the tests need (apt
# packages, pinned Go tools), then checks formatting, vet, generated code,
# systemd units, and runs every Go test, including the integration tests that
# start the controller and agents as separate processes.
#
#   scripts/test.sh            everything
#   scripts/test.sh -short     skip the slow integration tests
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(qemu-utils qemu-block-extra libnbd-bin nbdkit fuse3 xfsprogs btrfs-progs
  e2fsprogs util-linux curl jq tgt libiscsi-bin fio qemu-system-x86 qemu-system-common busybox-static linux-image-amd64
  etcd-server etcd-client prometheus chromium
  ceph-mon ceph-mgr ceph-osd ceph-common rbd-nbd librbd-dev librados-dev uuid-runtime)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing apt packages: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Pinned Go tools the tests run as separate processes, installed into
# $(go env GOPATH)/bin when missing or at another version.
VERSITYGW_VERSION=v1.8.0 # S3 server for drivers/s3 and datapath/chunkstore tests (drivers/s3/s3test)
gobin="$(go env GOPATH)/bin"
if ! go version -m "$gobin/versitygw" 2>/dev/null | grep -q "mod[[:space:]]*github.com/versity/versitygw[[:space:]]*$VERSITYGW_VERSION"; then
  echo "installing github.com/versity/versitygw@$VERSITYGW_VERSION" >&2
  GOBIN="$gobin" go install "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
fi
# Real gRPC clients for reflection and health (cmd/stowage/grpc_e2e_test.go).
GRPCURL_VERSION=v1.9.4
GRPC_HEALTH_PROBE_VERSION=v0.4.63
if ! go version -m "$gobin/grpcurl" 2>/dev/null | grep -q "mod[[:space:]]*github.com/fullstorydev/grpcurl[[:space:]]*$GRPCURL_VERSION"; then
  echo "installing github.com/fullstorydev/grpcurl@$GRPCURL_VERSION" >&2
  GOBIN="$gobin" go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
fi
if ! go version -m "$gobin/grpc-health-probe" 2>/dev/null | grep -q "mod[[:space:]]*github.com/grpc-ecosystem/grpc-health-probe[[:space:]]*$GRPC_HEALTH_PROBE_VERSION"; then
  echo "installing github.com/grpc-ecosystem/grpc-health-probe@$GRPC_HEALTH_PROBE_VERSION" >&2
  GOBIN="$gobin" go install "github.com/grpc-ecosystem/grpc-health-probe@$GRPC_HEALTH_PROBE_VERSION"
fi

echo "== gofmt" >&2
unformatted=$(gofmt -l $(git ls-files '*.go' | grep -v '^proto/gen/') 2>/dev/null || true)
if [ -n "$unformatted" ]; then echo "gofmt needed on:" >&2; echo "$unformatted" >&2; exit 1; fi

echo "== go vet" >&2
go vet ./...
# The Ceph RBD provider needs librbd (cgo) and builds only with its tags
# (pacific: Debian 12's Ceph 16.2); it is vetted and tested here.
CEPH_TAGS=ceph,pacific
go vet -tags "$CEPH_TAGS" ./drivers/rbd/...

echo "== generated code" >&2
scripts/proto.sh --check

echo "== systemd units" >&2
go build -o /tmp/stowage-verify-bin ./cmd/stowage
if [ -w /usr/local/bin ] && { [ ! -e /usr/local/bin/stowage ] || [ -n "${CI:-}" ]; }; then
  install -m 0755 /tmp/stowage-verify-bin /usr/local/bin/stowage
fi
if [ -x /usr/local/bin/stowage ]; then
  scripts/verify-units.sh
else
  echo "skipping systemd unit check: /usr/local/bin/stowage is not installed (run as root)" >&2
fi

echo "== prometheus rules and grafana dashboard" >&2
# promtool (Debian package prometheus): the alert rules parse and their
# unit tests pass; the dashboard's schema and metric names are checked by
# go test (cmd/stowage/deploy_test.go).
promtool check rules deploy/prometheus/stowage-alerts.yml
(cd deploy/prometheus && promtool test rules stowage-alerts_test.yml)

echo "== go test" >&2
# Figures the tests measure (e.g. the HA takeover time) are appended here
# and printed at the end.
export STOWAGE_TEST_REPORT
STOWAGE_TEST_REPORT=$(mktemp /tmp/stowage-test-report.XXXXXX)
# What tests keep (the web dashboard's screenshot), kept after the run.
export STOWAGE_TEST_ARTIFACTS="${STOWAGE_TEST_ARTIFACTS:-/tmp/stowage-test-artifacts}"
mkdir -p "$STOWAGE_TEST_ARTIFACTS"
go test -race -count=1 -timeout 20m "$@" ./...
# drivers/rbd against a one-node cluster it starts (deploy/ceph/bootstrap.sh).
go test -race -count=1 -timeout 5m -tags "$CEPH_TAGS" "$@" ./drivers/rbd/...
# An rbd store through a controller built with the provider (the test
# binary builds stowage with the same tags).
go test -race -count=1 -timeout 10m -tags "$CEPH_TAGS" -run 'TestRBD' "$@" ./cmd/stowage
if [ -s "$STOWAGE_TEST_REPORT" ]; then
  echo "== measured by the tests" >&2
  cat "$STOWAGE_TEST_REPORT" >&2
fi
rm -f "$STOWAGE_TEST_REPORT"
echo "test artifacts (screenshots): $STOWAGE_TEST_ARTIFACTS" >&2
echo "all tests passed" >&2
