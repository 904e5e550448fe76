#!/bin/sh
# Creates the credential files an overlay's secretGenerator reads (k8s/README.md lists
# them), with random secrets, readable by the current user only; never overwrites
# existing files, so running it again after an upgrade adds only the new ones.
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

# MinIO: the root (MinIO and the bucket Job only) and one user per workload.
write minio-root.env "MINIO_ROOT_USER=vdm-root" "MINIO_ROOT_PASSWORD=$(random)"
write s3.env "AWS_ACCESS_KEY_ID=vdm-pipelines" "AWS_SECRET_ACCESS_KEY=$(random)"
write mlflow-s3.env "AWS_ACCESS_KEY_ID=vdm-mlflow" "AWS_SECRET_ACCESS_KEY=$(random)"
write postgres.env "POSTGRES_PASSWORD=$(random)"
# MLflow: the admin, and one user each for the pipelines and serving.
write mlflow-admin.env "MLFLOW_AUTH_ADMIN_USERNAME=admin" "MLFLOW_AUTH_ADMIN_PASSWORD=$(random)" \
    "MLFLOW_FLASK_SERVER_SECRET_KEY=$(random)"
write mlflow-pipelines.env "MLFLOW_TRACKING_USERNAME=vdm-pipelines" "MLFLOW_TRACKING_PASSWORD=$(random)"
write mlflow-serving.ini "[mlflow]" "mlflow_tracking_username = vdm-serving" "mlflow_tracking_password = $(random)"
# Serving's API keys, one per line (add lines for more callers; remove one to revoke it).
write serving-api-keys "$(random)"
write serving-admin-keys "$(random)"
