#!/usr/bin/env bash
# Creates a private CA and the two certificates zfsync needs, with plain openssl.
#
#   scripts/make-certs.sh [-s SENDER_NAME] DIR [RECEIVER_NAME...]
#
# DIR gets ca.pem/ca.key (the CA; reused if DIR already has one), receiver.pem/
# receiver.key (server certificate, valid for localhost, 127.0.0.1, ::1 and every
# RECEIVER_NAME given: host names or IP addresses the sender connects to) and
# sender.pem/sender.key (client certificate whose CN and DNS name are SENDER_NAME,
# default "zfsync-sender": what the receiver's --allow-client matches).
# Copy ca.pem + receiver.* to the receiving host, ca.pem + sender.* to the sender.
# ZFSYNC_CERT_DAYS sets how long the two certificates are valid (default 825).
set -euo pipefail

sender_name=zfsync-sender
if [ "${1:-}" = "-s" ]; then
    sender_name=${2:?"-s needs a name"}
    shift 2
fi
dir=${1:?"usage: $0 [-s SENDER_NAME] DIR [RECEIVER_NAME...]"}
shift
command -v openssl >/dev/null || { echo "make-certs: openssl is not installed (apt-get install openssl)" >&2; exit 2; }
mkdir -p "$dir"
cd "$dir"
umask 077

if [ ! -f ca.key ]; then
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
    openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=zfsync CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem
fi

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for n in "$@"; do
    if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san="$san,IP:$n"; else san="$san,DNS:$n"; fi
done

issue() { # name cn san eku
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null
    openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=%s\n' \
        "$4" "$3" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
        -days "${ZFSYNC_CERT_DAYS:-825}" -extfile "$1.ext" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

first=${1:-localhost}
issue receiver "$first" "$san" serverAuth
issue sender "$sender_name" "DNS:$sender_name" clientAuth
chmod 644 ca.pem receiver.pem sender.pem
echo "certificates in $dir: ca.pem, receiver.pem/.key (for: ${san//DNS:/}), sender.pem/.key (CN $sender_name)"
