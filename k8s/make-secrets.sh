#!/bin/sh
# Creates the credential files an overlay's secretGenerator reads, with random
# secrets, readable by the current user only; never overwrites existing files.
#   k8s/make-secrets.sh dev|prod
# The files stay out of git (k8s/.gitignore); keep them wherever you keep secrets.
set -eu
overlay=${1:?usage: $0 dev|prod}
dir="$(cd "$(dirname "$0")" && pwd)/overlays/$overlay"
[ -f "$dir/kustomization.yaml" ] || { echo "no overlay $dir" >&2; exit 1; }
umask 077
mkdir -p "$dir/secrets"

random() { # 40 hex characters from the kernel's CSPRNG
    od -An -N20 -tx1 /dev/urandom | tr -d ' \n'
}

write() { # file, then KEY=VALUE lines
    file="$dir/secrets/$1"; shift
    if [ -e "$file" ]; then echo "kept    $file"; return; fi
    printf '%s\n' "$@" >"$file"
    echo "created $file"
}

write minio-root.env "MINIO_ROOT_USER=vdm-root" "MINIO_ROOT_PASSWORD=$(random)"
write s3.env "AWS_ACCESS_KEY_ID=vdm-platform" "AWS_SECRET_ACCESS_KEY=$(random)"
write postgres.env "POSTGRES_PASSWORD=$(random)"
