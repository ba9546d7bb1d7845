#!/usr/bin/env bash
# Makes the mutual TLS certificates of the services with the openssl CLI, for
# the dev overlay and for clusters without cert-manager (prod uses
# overlays/prod/certificates.yaml instead): a private CA and one certificate
# per caller, printed as the Secrets <name>-mtls (tls.crt, tls.key, ca.crt)
# that the Deployments mount.
#
# Usage: deploy/k8s/make-certs.sh [--days N] [--ca-days N] NAMESPACE [DIR]
#
#   bash deploy/k8s/make-certs.sh convo-dev | kubectl apply -f -
#
# Names: gateway, router-svc, llm-svc, store-svc, summary-svc and admin (an
# operator's certificate, for grpcurl or scripts: the methods that only read).
# Each certificate names NAME, NAME.NAMESPACE, NAME.NAMESPACE.svc and
# NAME.NAMESPACE.svc.cluster.local, in that order: a caller's name is the
# first label of the first one, and peers dial the others.
#
# DIR (default ./convo-certs-NAMESPACE, mode 700) keeps the CA's key and every
# file made. Run again with the same DIR to renew the services' certificates
# under the same CA (new keys too) and apply the output again: the services
# read the renewed files within TLS_REFRESH_SECONDS, without a restart.
# --days (default 90) is the services' validity, --ca-days (default 3650) the
# CA's, used only when DIR has no CA yet.
set -euo pipefail

NAMES=(gateway router-svc llm-svc store-svc summary-svc admin)
days=90
ca_days=3650

usage() {
  sed -n '2,23s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    --days) days="${2:?--days needs a number}"; shift 2 ;;
    --ca-days) ca_days="${2:?--ca-days needs a number}"; shift 2 ;;
    -h | --help) usage ;;
    -*) echo "make-certs.sh: unknown option '$1'" >&2; usage ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] && [ $# -le 2 ] || usage
ns="$1"
dir="${2:-./convo-certs-$ns}"
if ! [[ "$ns" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]]; then
  echo "make-certs.sh: '$ns' is not a Kubernetes namespace name" >&2
  exit 2
fi
for n in "$days" "$ca_days"; do
  if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
    echo "make-certs.sh: '$n' is not a number of days" >&2
    exit 2
  fi
done
command -v openssl > /dev/null || { echo "make-certs.sh: openssl is not installed" >&2; exit 1; }

umask 077
mkdir -p "$dir"
ssl() { openssl "$@" 2> "$dir/openssl.log" || { cat "$dir/openssl.log" >&2; exit 1; }; }

# The CA, made once per DIR: renewing the services never changes the trust.
if [ ! -s "$dir/ca.key" ] || [ ! -s "$dir/ca.crt" ]; then
  ssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days "$ca_days" -subj "/CN=convo-internal-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
  echo "make-certs.sh: new CA in $dir (valid $ca_days days)" >&2
fi

b64() { base64 -w0 < "$1"; }

for name in "${NAMES[@]}"; do
  sans="DNS:$name,DNS:$name.$ns,DNS:$name.$ns.svc,DNS:$name.$ns.svc.cluster.local"
  cat > "$dir/$name.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = $sans
EOF
  ssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "/CN=$name"
  ssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days "$days" -sha256 -extfile "$dir/$name.ext" -out "$dir/$name.crt"
  cat <<EOF
apiVersion: v1
kind: Secret
metadata:
  name: $name-mtls
  namespace: $ns
  labels: {app.kubernetes.io/name: $name, app.kubernetes.io/part-of: convo}
type: kubernetes.io/tls
data:
  tls.crt: $(b64 "$dir/$name.crt")
  tls.key: $(b64 "$dir/$name.key")
  ca.crt: $(b64 "$dir/ca.crt")
---
EOF
done
echo "make-certs.sh: ${#NAMES[@]} certificates for namespace $ns (valid $days days) in $dir" >&2
