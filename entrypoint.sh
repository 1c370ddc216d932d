#!/bin/sh
# Image entrypoint: `ckptd run` around the container's command, under an init such as tini.
#
#   entrypoint.sh                         ckptd run (start_commands from the config file)
#   entrypoint.sh python train.py ...     ckptd run -- python train.py ...
#   entrypoint.sh --drain-timeout 60 -- python train.py    options for ckptd run, then CMD
#   entrypoint.sh watch|restore|ls|...    that ckptd command
#
# Secrets from files (Docker and Kubernetes secrets): VAR_FILE=/path exports VAR with the file's
# content, for the AWS credential variables and every CKPTD_* setting, so no secret is ever on a
# command line (`ps`) or in the image. AWS's own *_FILE variables (AWS_WEB_IDENTITY_TOKEN_FILE,
# AWS_SHARED_CREDENTIALS_FILE, ...) name files on purpose and are left alone.
set -eu

for file_var in $(env | sed -n 's/^\(\(AWS_ACCESS_KEY_ID\|AWS_SECRET_ACCESS_KEY\|AWS_SESSION_TOKEN\|CKPTD_[A-Z0-9_]*\)_FILE\)=.*/\1/p'); do
  var=${file_var%_FILE}
  path=$(printenv "$file_var")
  if [ -n "$(printenv "$var" 2>/dev/null || true)" ]; then
    echo "entrypoint: both $var and $file_var are set; keep one" >&2
    exit 2
  fi
  if [ ! -r "$path" ]; then
    echo "entrypoint: $file_var names $path, which cannot be read" >&2
    exit 2
  fi
  value=$(cat "$path")
  export "$var=$value"
  unset "$file_var"
done

# The daemon lives in a virtual environment of its own, apart from the trainer's packages.
CKPTD=${CKPTD_BIN:-/opt/ckptd/bin/ckptd}
[ -x "$CKPTD" ] || CKPTD=ckptd

case "${1-}" in
  run | watch | restore | ls | inspect | urls | download | prune | version) exec "$CKPTD" "$@" ;;
  "") exec "$CKPTD" run ;;
  -*) exec "$CKPTD" run "$@" ;;
  *) exec "$CKPTD" run -- "$@" ;;
esac
