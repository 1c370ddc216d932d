# ckptd as the entrypoint of a training image.
#
#   docker build -t my-trainer --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3 .
#
# BASE_IMAGE is the trainer's image: its Python, packages and libraries are the trainer's and ckptd
# never touches them. ckptd lives in /opt/ckptd, a virtual environment of its own interpreter, built
# from BUILDER_IMAGE's Python with every library it needs except glibc. So the base needs only glibc
# (at least BUILDER_IMAGE's: 2.31 for the default) and /bin/sh; any Python it has, or none, is left
# alone. docs/image.md: adding ckptd to an existing image, read-only root file systems, sizes.

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG BUILDER_IMAGE=python:3.11-slim-bullseye

FROM ${BUILDER_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1
COPY packaging/bundle.py /build/bundle.py
RUN python3 /build/bundle.py interpreter /opt/ckptd
# Dependencies before the source, so a change to ckptd's code reuses this layer.
COPY pyproject.toml /build/src/pyproject.toml
RUN python3 /build/bundle.py deps /opt/ckptd /build/src/pyproject.toml
COPY README.md /build/src/README.md
COPY daemon /build/src/daemon
RUN python3 /build/bundle.py ckptd /opt/ckptd /build/src
COPY --chmod=0755 entrypoint.sh /opt/ckptd/entrypoint.sh

FROM ${BASE_IMAGE}
ARG CKPTD_UID=65532
ARG CKPTD_GID=65532
ARG VERSION=dev
ARG REVISION=unknown
# Where the source lives (this repository has no canonical URL yet): pass --build-arg SOURCE_URL=...
ARG SOURCE_URL=
LABEL org.opencontainers.image.title="ckptd" \
      org.opencontainers.image.description="Training image with ckptd: restores checkpoints, runs the trainer, uploads every completed checkpoint file to S3-compatible storage" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /opt/ckptd /opt/ckptd
# A passwd entry for the numeric user (getpass, torch.compile and ssh want one) and `ckptd` on PATH
# through a link: ckptd's venv is never put on PATH, its python would shadow the trainer's. As root:
# some bases end with a USER of their own.
USER 0:0
RUN --mount=type=bind,source=packaging/add-user.sh,target=/tmp/add-user.sh \
    sh /tmp/add-user.sh "${CKPTD_UID}" "${CKPTD_GID}"
USER ${CKPTD_UID}:${CKPTD_GID}
# dumb-init as PID 1 runs entrypoint.sh (then ckptd) in a session of its own and passes every
# signal to that group; ckptd forwards them to the trainer's own group and drains before it exits.
ENTRYPOINT ["/opt/ckptd/bin/dumb-init", "--", "/opt/ckptd/entrypoint.sh"]
# No command: the base's (often `python3`) would become the training command. `ckptd run` then
# runs the config file's start_commands; a derived image sets CMD ["python", "train.py"].
CMD []
