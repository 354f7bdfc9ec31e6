#!/usr/bin/env bash
# Debian packages, installed only when missing.
#   scripts/system-deps.sh               what the tests talk to: a real Prometheus server, kcat
#                                        (an independent librdkafka Kafka client), Java and Maven
#                                        for the local Kafka broker, headless Chromium (the
#                                        status page test)
#   scripts/system-deps.sh --containers  what `make image` builds with: podman and buildah with
#                                        runc (not crun: see deploy/podman/containers.conf), and
#                                        mmdebstrap, which makes the base image from Debian's mirror
set -euo pipefail
# command:package
wanted=(prometheus:prometheus promtool:prometheus kcat:kcat java:openjdk-17-jre-headless mvn:maven chromium:chromium)
if [ "${1:-}" = "--containers" ]; then
  wanted=(podman:podman buildah:buildah runc:runc mmdebstrap:mmdebstrap)
fi
missing=()
for pair in "${wanted[@]}"; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "system-deps: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
