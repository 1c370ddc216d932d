#!/bin/sh
# Runs in the image's final stage, on the user's base image: add-user.sh UID GID
#
# Gives the numeric user ckptd runs as a passwd and group entry when the base has none: Kubernetes
# and Docker run a numeric USER without one, but the trainer's tools do not (getpass.getuser(), which
# torch.compile's cache uses, ssh, some launchers). Uses nothing but sh, mkdir, chown and ln, so that
# bases without useradd (busybox, distroless-like) work too. An existing entry is left as it is.
set -eu
uid=$1
gid=$2

has_id() { # has_id FILE FIELD VALUE: some line of FILE has VALUE in its FIELD-th field
  [ -f "$1" ] || return 1
  while IFS=: read -r f1 f2 f3 f4 _; do
    eval "field=\$f$2"
    [ "$field" = "$3" ] && return 0
  done <"$1"
  return 1
}

if [ "$uid" != 0 ]; then
  has_id /etc/group 3 "$gid" || echo "ckptd:x:$gid:" >>/etc/group
  if ! has_id /etc/passwd 3 "$uid"; then
    shell=/usr/sbin/nologin
    [ -x "$shell" ] || shell=/bin/false
    echo "ckptd:x:$uid:$gid:ckptd:/home/ckptd:$shell" >>/etc/passwd
    # The home is writable on a writable root; on a read-only one mount a volume there (or set
    # HOME): ckptd itself writes only to its checkpoint and restore folders, /tmp and XDG_DATA_HOME.
    mkdir -p /home/ckptd
    chown "$uid:$gid" /home/ckptd
  fi
fi

# `ckptd` on the trainer's PATH without putting ckptd's venv (and its python) there.
mkdir -p /usr/local/bin
ln -sf /opt/ckptd/bin/ckptd /usr/local/bin/ckptd
