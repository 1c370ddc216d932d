"""`ckptd restore`: the init container. Also the first phase of `ckptd run`.

What to restore: `load_checkpoint_config.checkpoints` of the config file, or `--load` /
`$CKPTD_LOAD` (`job=J;project=P,metric=eval_loss,mode=min;job=J,checkpoint=checkpoint-20,required`,
see daemon/config/refs.py). Files land in `{restore dir}/rank-{N}/`, and the top of the restore
folder links to this rank's restored checkpoints and root files (daemon/restore/links.py).

`--json` prints the restore report (also written to `{restore dir}/ckptd-restore.json`): files,
bytes, downloaded_files, downloaded_bytes, kept_files, seconds; restored: one entry per reference
that restored something (ref, project, job_id, source_rank, checkpoint, step, committed_at, target,
files, bytes, root_files); missing: optional references that matched nothing; refused: optional
references whose folder was in the way; links: the names linked at the top of the restore folder.

Exit codes: 0 restored (or nothing asked / nothing matched an optional reference), 2 two
references land on one path (or bring one root file with different bytes), 3 a required reference
matched nothing or a download failed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict

import structlog

from daemon import exits
from daemon.commands import show
from daemon.config import Config
from daemon.progress import Bar
from daemon.restore.restorer import RestoreConflict, RestoreFailed, RestoreReport, restore
from daemon.storage import Storage, StorageError

log = structlog.get_logger()


async def restore_phase(c: Config, storage: Storage, report_to: list | None = None) -> int | None:
    """Restore what the config asks for; None when training may start, else the exit code."""
    # get_last_checkpoint(f"{BT_LOAD_CHECKPOINT_DIR}/rank-{N}") lists the folder: it must exist.
    rank_dir = os.path.join(c.restore_dir, f"rank-{c.node_rank}")
    try:
        if not os.path.lexists(rank_dir):  # noqa: ASYNC240 - one stat at start; a link there is refused by restore()
            os.makedirs(rank_dir, exist_ok=True)
    except OSError as e:
        log.error("restore folder not usable: training not started", path=rank_dir, error=str(e))
        return exits.RESTORE
    if not c.checkpoints:
        return None
    if not c.restore_enabled:
        log.warning("checkpoints are listed but load_checkpoint_config.enabled is false: nothing restored")
        return None
    try:
        report = await restore(
            storage,
            refs=c.checkpoints,
            restore_dir=c.restore_dir,
            rank=c.node_rank,
            default_project=c.project,
            markers=c.markers,
            progress=Bar("restoring"),
        )
    except RestoreConflict as e:
        log.error("restore refused", error=str(e))
        return exits.CONFIG
    except (RestoreFailed, StorageError) as e:
        log.error("restore failed: training not started", error=str(e))
        return exits.RESTORE
    if report_to is not None:
        report_to.append(report)
    return None


def main(c: Config, args: argparse.Namespace) -> int:
    import uvloop

    from daemon.commands.common import storage_for

    async def go() -> int | None:
        async with storage_for(c) as storage:
            return await restore_phase(c, storage, reports)

    reports: list[RestoreReport] = []
    code = uvloop.run(go())
    if args.json and code is None:  # a failure has said why on stderr; nothing asked: an empty report
        show.print_json(asdict(reports[0] if reports else RestoreReport(0, 0, 0, 0, 0, 0.0, [], [])))
    return code or exits.OK
