#!/bin/sh
# Runs a build command (cargo, pip) trusting an extra CA bundle when one is given as the build
# secret `ca` (`--secret id=ca,src=FILE`): what a build behind a TLS-inspecting proxy needs.
# The bundle is read from the secret mount for this one command and never lands in a layer.
set -eu
ca=/run/secrets/ca
if [ -s "$ca" ]; then
  # the image's own roots plus the extra ones, in a file removed when the command ends
  bundle=$(mktemp)
  trap 'rm -f "$bundle"' EXIT
  cat /etc/ssl/certs/ca-certificates.crt "$ca" >"$bundle"
  SSL_CERT_FILE=$bundle CARGO_HTTP_CAINFO=$bundle PIP_CERT=$bundle REQUESTS_CA_BUNDLE=$bundle \
    "$@"
else
  "$@"
fi
