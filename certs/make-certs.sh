#!/usr/bin/env bash
# Development certificates for the broker's ssl: endpoints: a CA, a server certificate for
# localhost / 127.0.0.1 / ::1 and a client certificate (CN=client), all EC P-256.
#
#   certs/make-certs.sh [OUTDIR]     (OUTDIR defaults to the directory of this script)
#
# Idempotent: files that exist, belong together and are valid for another 30 days are kept;
# anything missing, mismatched or expiring is made again (a new CA means new leaf certificates).
# For development and tests only: the CA key is unprotected.
set -euo pipefail

DAYS=825            # the longest validity Apple platforms accept for TLS server certificates
RENEW_WITHIN=$((30 * 24 * 3600))

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-$here}
if [[ $# -gt 1 ]]; then
    echo "usage: $0 [OUTDIR]" >&2
    exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)

command -v openssl >/dev/null || { echo "$0: openssl is not installed" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077  # private keys are readable by their owner only

newkey() {  # newkey FILE: an EC P-256 key in PKCS#8 PEM
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

pubkey_of_key() { openssl pkey -in "$1" -pubout 2>/dev/null; }
pubkey_of_cert() { openssl x509 -in "$1" -noout -pubkey 2>/dev/null; }

# usable CERT KEY [CA]: the pair exists, matches, lasts another 30 days and (with CA) chains to it.
usable() {
    local cert=$1 key=$2 ca=${3:-}
    [[ -s $cert && -s $key ]] || return 1
    [[ "$(pubkey_of_key "$key")" == "$(pubkey_of_cert "$cert")" ]] || return 1
    openssl x509 -in "$cert" -noout -checkend "$RENEW_WITHIN" >/dev/null 2>&1 || return 1
    if [[ -n $ca ]]; then
        openssl verify -CAfile "$ca" "$cert" >/dev/null 2>&1 || return 1
    fi
}

install_pair() {  # install_pair NAME: move NAME.pem and NAME.key from the work dir into place
    chmod 644 "$work/$1.pem"
    chmod 600 "$work/$1.key"
    mv -f "$work/$1.key" "$out/$1.key"
    mv -f "$work/$1.pem" "$out/$1.pem"
    echo "wrote $out/$1.pem"
    echo "wrote $out/$1.key"
}

serial() { echo "0x$(openssl rand -hex 16)"; }

# --- the CA ---------------------------------------------------------------------------
new_ca=0
if usable "$out/ca.pem" "$out/ca.key" && openssl x509 -in "$out/ca.pem" -noout -text | grep -q 'CA:TRUE'; then
    echo "kept  $out/ca.pem (and ca.key)"
else
    cat >"$work/ca.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
O = mqtt_broker development
CN = mqtt_broker development CA
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
    newkey "$work/ca.key"
    openssl req -new -x509 -config "$work/ca.cnf" -key "$work/ca.key" -sha256 \
        -days "$DAYS" -set_serial "$(serial)" -out "$work/ca.pem"
    install_pair ca
    new_ca=1
fi

# --- leaf certificates ------------------------------------------------------------------
# leaf NAME CN EXTENSIONS
leaf() {
    local name=$1 cn=$2 extensions=$3
    if [[ $new_ca == 0 ]] && usable "$out/$name.pem" "$out/$name.key" "$out/ca.pem"; then
        echo "kept  $out/$name.pem (and $name.key)"
        return
    fi
    printf '[ext]\n%s\n' "$extensions" >"$work/$name.ext"
    newkey "$work/$name.key"
    openssl req -new -key "$work/$name.key" -subj "/O=mqtt_broker development/CN=$cn" \
        -out "$work/$name.csr"
    openssl x509 -req -in "$work/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
        -set_serial "$(serial)" -days "$DAYS" -sha256 \
        -extfile "$work/$name.ext" -extensions ext -out "$work/$name.pem" 2>/dev/null
    install_pair "$name"
}

leaf server localhost "basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer"

leaf client client "basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer"
