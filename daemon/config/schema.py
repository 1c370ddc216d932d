"""Every setting of ckptd, declared once: default, help, parser, flag, environment, config-file key.

`Config` is the validated result; `loader.load` fills it with flag > environment > file > default.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from daemon.config import parse
from daemon.config.artifacts import ArtifactRef, parse_artifact_refs
from daemon.config.environment import Environment, parse_environment
from daemon.config.refs import CheckpointRef, parse_refs
from daemon.storage.options import ADDRESSING_STYLES, CHECKSUM_MODES, PAYLOAD_SIGNING, SSE_MODES

# Flag groups: each command offers the flags of the groups it uses (see cli.py).
COMMON, STORAGE, UPLOAD, RESTORE, SUPERVISE, SERVE = "common", "storage", "upload", "restore", "run", "serve"
RETENTION, DOWNLOAD = "retention", "download"

MiB = 1 << 20
# S3 limits: a single PUT and a part both hold at most 5 GiB.
MAX_PUT = 5 << 30
# Kubernetes' limit on an indexed Job's completions; no training job has more nodes.
MAX_NODES = 100_000
_COUNT = parse.optional(parse.integer(1, 10**9))
# Temporary names: suffixes, editors' files, HF's tmp-checkpoint-N folder, ckptd's own state, and
# Rust's tempfile crate (".tmp" + 6 characters: safetensors and tokenizers write then rename).
DEFAULT_IGNORE = (
    "*.tmp", "*.part", "*.lock", "*.swp", "*.swx", "*~", ".#*", "#*#",
    "tmp-checkpoint-*", ".ckptd*", ".tmp*",
)  # fmt: skip
DEFAULT_MARKERS = ("trainer_state.json", ".metadata")


@dataclass(frozen=True)
class Spec:
    key: str  # the config-file path, dotted
    default: Any  # a value, or a callable taking the environment
    help: str
    parse: parse.Parser
    group: str
    flag: str | None = None
    env: tuple[str, ...] = ()


def setting(key: str, default: Any, help: str, parser: parse.Parser, group: str, flag: str | None = None,
            env: tuple[str, ...] = ()) -> Any:  # fmt: skip
    return field(metadata={"spec": Spec(key, default, help, parser, group, flag, env)})


def _default_storage(env: Mapping[str, str]) -> str:
    data_home = env.get("XDG_DATA_HOME") or os.path.join(env.get("HOME", "/root"), ".local", "share")
    return f"file://{os.path.abspath(data_home)}/ckptd/store"


def _new_job_id(env: Mapping[str, str]) -> str:
    # Time-sortable: lexical order of ids is creation order, and two nodes never collide.
    return time.strftime("%Y%m%dt%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


# The settings table: one row per setting, aligned by hand so it reads as a table.
# fmt: off
@dataclass(frozen=True)
class Config:
    # --- identity
    project: str = setting("project", "default", "Training project name (one key segment).", parse.name, COMMON,
                           "--project", ("CKPTD_PROJECT", "BT_TRAINING_PROJECT_NAME"))
    job_id: str = setting("job_id", _new_job_id, "Job id; generated (time-sortable) when unset, required when "
                          "group size > 1.", parse.name, COMMON, "--job-id", ("CKPTD_JOB_ID", "BT_TRAINING_JOB_ID"))
    node_rank: int = setting("node_rank", 0, "This node's rank; files go under rank-N/.",
                             parse.integer(0, MAX_NODES - 1), COMMON, "--node-rank",
                             ("CKPTD_NODE_RANK", "BT_NODE_RANK", "NODE_RANK", "GROUP_RANK", "JOB_COMPLETION_INDEX"))
    group_size: int = setting("group_size", 1, "Number of nodes in the job.", parse.integer(1, MAX_NODES), COMMON,
                              "--group-size", ("CKPTD_GROUP_SIZE", "BT_GROUP_SIZE"))
    log_level: str = setting("log_level", "info", "Log level.", parse.choice("debug", "info", "warning", "error"),
                             COMMON, "--log-level", ("CKPTD_LOG_LEVEL",))
    log_format: str = setting("log_format", "auto", "Log format; auto is JSON lines unless stderr is a terminal.",
                              parse.choice("auto", "json", "console"), COMMON, "--log-format", ("CKPTD_LOG_FORMAT",))
    # --- storage
    storage: str = setting("storage.url", _default_storage, "Where checkpoints are stored: s3://BUCKET[/PREFIX] or "
                           "file:///ABS/PATH (default: this machine only).", parse.storage_url, STORAGE, "--storage",
                           ("CKPTD_STORAGE",))
    s3_endpoint_url: str | None = setting("storage.endpoint_url", None, "S3 endpoint for S3-compatible stores.",
                                          parse.optional(parse.http_url), STORAGE, "--s3-endpoint-url",
                                          ("CKPTD_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"))
    s3_region: str | None = setting("storage.region", None, "S3 region (default us-east-1).",
                                    parse.optional(parse.text), STORAGE, "--s3-region",
                                    ("CKPTD_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"))
    s3_addressing_style: str = setting("storage.addressing_style", "auto", "Bucket addressing: path for most "
                                       "self-hosted stores.", parse.choice(*ADDRESSING_STYLES), STORAGE,
                                       "--s3-addressing-style", ("CKPTD_S3_ADDRESSING_STYLE",))
    s3_checksum: str = setting("storage.checksum", "crc32c", "Per-request checksum the store verifies; md5 for stores "
                               "that reject flexible checksums (older MinIO, Ceph, R2).", parse.choice(*CHECKSUM_MODES),
                               STORAGE, "--s3-checksum", ("CKPTD_S3_CHECKSUM",))
    s3_payload_signing: str = setting("storage.payload_signing", "auto", "SHA-256 payload signing; auto signs only "
                                      "when no checksum covers the body.", parse.choice(*PAYLOAD_SIGNING), STORAGE,
                                      "--s3-payload-signing", ("CKPTD_S3_PAYLOAD_SIGNING",))
    s3_sse: str = setting("storage.sse", "none", "Server-side encryption.", parse.choice(*SSE_MODES), STORAGE,
                          "--s3-sse", ("CKPTD_S3_SSE",))
    s3_sse_kms_key_id: str | None = setting("storage.sse_kms_key_id", None, "KMS key id for sse-kms.",
                                            parse.optional(parse.text), STORAGE, "--s3-sse-kms-key-id",
                                            ("CKPTD_S3_SSE_KMS_KEY_ID",))
    s3_ca_bundle: str | None = setting("storage.ca_bundle", None, "CA bundle for a store with a private CA.",
                                       parse.optional(parse.absolute_path), STORAGE, "--s3-ca-bundle",
                                       ("CKPTD_S3_CA_BUNDLE", "AWS_CA_BUNDLE"))
    s3_max_connections: int = setting("storage.max_connections", 64, "Concurrent HTTP connections to the store.",
                                      parse.integer(1, 1024), STORAGE, "--s3-max-connections",
                                      ("CKPTD_S3_MAX_CONNECTIONS",))
    # --- what to watch and upload
    checkpointing_enabled: bool = setting("checkpointing_config.enabled", True, "Upload the checkpoint folder.",
                                          parse.boolean, UPLOAD, "--checkpointing", ("CKPTD_CHECKPOINTING",))
    checkpoint_dir: str = setting("checkpointing_config.checkpoint_path", "/tmp/training_checkpoints",
                                  "Checkpoint folder the trainer writes and ckptd watches.", parse.absolute_path,
                                  UPLOAD, "--checkpoint-dir", ("BT_CHECKPOINT_DIR",))
    part_size: int | None = setting("upload.part_size", None, "Multipart part size; unset adapts to the file size.",
                                    parse.optional(parse.size(5 * MiB, MAX_PUT)), UPLOAD, "--part-size",
                                    ("CKPTD_PART_SIZE",))
    multipart_threshold: int = setting("upload.multipart_threshold", 16 * MiB, "Files at least this big are "
                                       "uploaded in parallel parts.", parse.size(5 * MiB, MAX_PUT), UPLOAD,
                                       "--multipart-threshold", ("CKPTD_MULTIPART_THRESHOLD",))
    upload_concurrency: int = setting("upload.concurrency", 8, "Large files uploaded at once (small ones: twice as "
                                      "many).", parse.integer(1, 256), UPLOAD, "--upload-concurrency",
                                      ("CKPTD_UPLOAD_CONCURRENCY",))
    parts_in_flight: int = setting("upload.parts_in_flight", 8, "Parts in flight across all files (bounds memory).",
                                   parse.integer(1, 256), UPLOAD, "--parts-in-flight", ("CKPTD_PARTS_IN_FLIGHT",))
    settle_time: float = setting("upload.settle_time", 0.2, "A file must be unchanged this long to be complete.",
                                 parse.duration(), UPLOAD, "--settle-time", ("CKPTD_SETTLE_TIME",))
    quiet_commit: float = setting("upload.quiet_commit", 60.0, "Commit a checkpoint without a marker once it has "
                                  "been quiet this long.", parse.duration(1), UPLOAD, "--quiet-commit",
                                  ("CKPTD_QUIET_COMMIT",))
    rank_lag_alert: float = setting("upload.rank_lag_alert", 600.0, "Multi-node jobs: warn, and raise the "
                                    "CkptdRankLagging alert, once a checkpoint has waited this long for other "
                                    "ranks' files.", parse.duration(1), UPLOAD, "--rank-lag-alert",
                                    ("CKPTD_RANK_LAG_ALERT",))
    rescan_interval: float = setting("upload.rescan_interval", 30.0, "Reconciliation scan period (inotify is a "
                                     "hint, not the truth).", parse.duration(1), UPLOAD, "--rescan-interval",
                                     ("CKPTD_RESCAN_INTERVAL",))
    watch_mode: str = setting("upload.watch_mode", "auto", "inotify, poll, or auto (poll on NFS, FUSE, SMB, Ceph).",
                              parse.choice("auto", "inotify", "poll"), UPLOAD, "--watch-mode", ("CKPTD_WATCH_MODE",))
    ignore_patterns: tuple[str, ...] = setting("upload.ignore_patterns", DEFAULT_IGNORE, "File name globs never "
                                               "uploaded (replaces the defaults).", parse.string_list, UPLOAD,
                                               "--ignore", ("CKPTD_IGNORE",))
    markers: tuple[str, ...] = setting("upload.markers", DEFAULT_MARKERS, "File name globs that complete a "
                                       "checkpoint.", parse.string_list, UPLOAD, "--marker", ("CKPTD_MARKERS",))
    bandwidth_limit: int = setting("upload.bandwidth_limit", 0, "Upload bytes per second; 0 is unlimited.",
                                   parse.size(0), UPLOAD, "--bandwidth-limit", ("CKPTD_BANDWIDTH_LIMIT",))
    # 19, not 10: beside a CPU-bound training loop on a shared core, a training step took 11-17 %
    # longer while ckptd uploaded at 10, 4.5 % at 19 (docs/benchmarks.md, scenario 6).
    nice: int = setting("upload.nice", 19, "CPU niceness of the uploader (the trainer keeps its own).",
                        parse.integer(0, 19), UPLOAD, "--nice", ("CKPTD_NICE",))
    io_priority: str = setting("upload.io_priority", "best-effort", "I/O class of the uploader: best-effort (lowest "
                               "level), idle, or normal.", parse.choice("best-effort", "idle", "normal"), UPLOAD,
                               "--io-priority", ("CKPTD_IO_PRIORITY",))
    cpu_affinity: tuple[int, ...] | None = setting("upload.cpu_affinity", None, "CPUs the uploader may use, e.g. 0-1.",
                                                   parse.cpu_list, UPLOAD, "--cpu-affinity", ("CKPTD_CPU_AFFINITY",))
    min_free_bytes: int = setting("upload.min_free_bytes", 0, "Opt-in: remove local copies of older committed "
                                  "checkpoints to keep this much free; 0 is off.", parse.size(0), UPLOAD,
                                  "--min-free-bytes", ("CKPTD_MIN_FREE_BYTES",))
    prune_enabled: bool = setting("retention.enabled", False, "Opt-in: apply the retention rules to this job's "
                                  "stored checkpoints after each commit.", parse.boolean, UPLOAD, "--prune",
                                  ("CKPTD_PRUNE",))
    drain_timeout: float = setting("drain_timeout", 300.0, "How long to keep uploading after training ends.",
                                   parse.duration(), UPLOAD, "--drain-timeout", ("CKPTD_DRAIN_TIMEOUT",))
    # --- restore
    restore_enabled: bool = setting("load_checkpoint_config.enabled", False, "Restore checkpoints before training.",
                                    parse.boolean, RESTORE, "--restore", ("CKPTD_RESTORE",))
    restore_dir: str = setting("load_checkpoint_config.download_folder", "/tmp/loaded_checkpoints", "Folder "
                               "restored checkpoints go to.", parse.absolute_path, RESTORE, "--restore-dir",
                               ("BT_LOAD_CHECKPOINT_DIR",))
    checkpoints: tuple[CheckpointRef, ...] = setting("load_checkpoint_config.checkpoints", (), "Checkpoint references "
                                                     "to restore, e.g. 'job=J', 'project=P,metric=eval_loss,mode=min',"
                                                     " 'job=J,checkpoint=checkpoint-20'; ';' between several; implies "
                                                     "--restore.", parse_refs, RESTORE, "--load", ("CKPTD_LOAD",))
    # --- retention: `ckptd prune`, and during training with retention.enabled
    keep_last: int | None = setting("retention.keep_last", None, "Keep the N most recent committed checkpoints.",
                                    _COUNT, RETENTION, "--keep-last", ("CKPTD_KEEP_LAST",))
    keep_best: int | None = setting("retention.keep_best", None, "Keep the K best committed checkpoints by "
                                    "retention.metric.", _COUNT, RETENTION, "--keep-best", ("CKPTD_KEEP_BEST",))
    metric: str | None = setting("retention.metric", None, "Manifest metric that ranks checkpoints, e.g. eval_loss.",
                                 parse.optional(parse.metric_name), RETENTION, "--metric", ("CKPTD_METRIC",))
    mode: str = setting("retention.mode", "min", "Which end of the metric is best.", parse.choice("min", "max"),
                        RETENTION, "--mode", ("CKPTD_METRIC_MODE",))
    keep_every_steps: int | None = setting("retention.keep_every_steps", None, "Keep every checkpoint whose step is "
                                           "a multiple of S.", _COUNT, RETENTION, "--keep-every-steps",
                                           ("CKPTD_KEEP_EVERY_STEPS",))
    # --- download (the reference's serving config)
    download_folder: str = setting("training_checkpoints.download_folder", "/tmp/training_checkpoints", "Folder "
                                   "`download` writes to, as DIR/{job_id}/rank-N/....", parse.local_path, DOWNLOAD,
                                   "--to", ("CKPTD_DOWNLOAD_FOLDER",))
    artifact_references: tuple[ArtifactRef, ...] = setting("training_checkpoints.artifact_references", (), "What "
                                                           "`download` fetches: [{training_job_id, paths}] (config "
                                                           "file; or --job with --path).", parse_artifact_refs,
                                                           DOWNLOAD)
    # --- supervision
    start_commands: tuple[str, ...] = setting("start_commands", (), "Shell commands run in order (or give CMD "
                                              "after --).", parse.command_list, SUPERVISE)
    environment_variables: Environment = setting("environment_variables", {}, "Environment of the start commands "  # noqa: RUF009
                                                 "(config file only): NAME: value, or NAME: {name: SECRET} read "
                                                 "from $SECRET or the file $SECRET_FILE.", parse_environment,
                                                 SUPERVISE)
    stop_timeout: float = setting("stop_timeout", 30.0, "After forwarding a stop signal, kill the trainer this much "
                                  "later.", parse.duration(), SUPERVISE, "--stop-timeout", ("CKPTD_STOP_TIMEOUT",))
    metrics_addr: tuple[str, int] = setting("metrics_addr", "0.0.0.0:9477", "Metrics and health listen address.",
                                            parse.listen_address, SERVE, "--metrics-addr", ("CKPTD_METRICS_ADDR",))
    # Not a setting: the settings given by a flag, the environment or the config file, not defaulted.
    explicit: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

# fmt: on


SPECS: dict[str, Spec] = {f.name: f.metadata["spec"] for f in fields(Config) if "spec" in f.metadata}
BY_KEY: dict[str, str] = {spec.key: name for name, spec in SPECS.items()}


def default_of(spec: Spec, env: Mapping[str, str]) -> Any:
    value = spec.default(env) if isinstance(spec.default, Callable) else spec.default
    # Defaults go through the parser too, so every value has one canonical form.
    return value if value is None or isinstance(value, tuple) else spec.parse(value)
