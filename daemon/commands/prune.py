"""`ckptd prune`: retention by rules (latest N, best K by a metric, every S steps), or a whole job.

Prints the plan and deletes nothing unless --yes. Exit codes: 0 done (or nothing to delete),
5 (exits.PLANNED) the plan would delete something and --yes was not given, 1 an unknown job, a
missing metric, a store error or --all on a job still running (without --force), 2 contradictory
or missing flags, 130 interrupted (Ctrl-C): the next prune finishes what it left.

--json prints one object:
    project, job_id, rules {keep_last, keep_best, metric, mode, keep_every_steps}, dry_run,
    checkpoints: [{checkpoint, step, metric (the value of rules.metric, or null), bytes, files,
                   ranks, committed_at, action ("keep" | "delete"), reasons, uncommitted_ranks}],
    interrupted: [{checkpoint, rank, committed_at, action ("finish" | "drop"), bytes}]
        (earlier prunes that did not finish; "drop": only the record goes),
    to_delete, bytes_to_free (the interrupted prunes' bytes included),
    and with --yes: deleted: [{checkpoint, ranks, files, bytes, interrupted}], bytes_freed.
With --all: project, job_id, all, dry_run, files, bytes, and with --yes deleted_files, bytes_freed.
Reasons a checkpoint is kept: root, in_progress, uncommitted, latest, keep_last, keep_best,
keep_every_steps (see daemon.catalog.retention).

A multi-node job (daemon.catalog.jobview: its checkpoints commit globally) is judged as restore
sees it: only globally committed checkpoints are ranked (their step, commit time and metrics are
the global manifest's, their ranks every rank it or a part names); one whose parts are stored but
whose global manifest is not is uncommitted and kept. Deleting one deletes its global manifest
before anything else, then every rank's part and files (daemon.catalog.prune).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Mapping
from typing import Any, Literal

from daemon import exits
from daemon.catalog import browse, jobmeta, layout, prune, retention
from daemon.catalog.manifest import parse_step
from daemon.commands import show
from daemon.config import Config
from daemon.storage import Storage, StorageError
from daemon.storage.retry import Deadline

RETRY_SECONDS = 120.0  # how long transient store errors are retried before the prune stops
RULES = ("keep_last", "keep_best", "metric", "mode", "keep_every_steps")
INTERRUPTED = "interrupted: run ckptd prune again to finish"

Source = Literal["flag", "setting", "default"]


def rule_used(source: Source, name: str, whole_job: bool, keep_best_given: bool) -> bool:
    """Whether a retention setting from `source` (a command-line flag; the environment or a config
    file; its default) takes part in this prune. Settings from the environment or a config file are
    standing defaults for every prune, so they must not turn an unrelated run into an error: --all
    ignores them, and a metric (or mode) set there means nothing without --keep-best.

    | source  | name          | --all | keep_best given | used                            |
    |---------|---------------|-------|-----------------|---------------------------------|
    | default | any           | any   | any             | yes (None, or mode "min")       |
    | flag    | any           | any   | any             | yes (--all with it is refused)  |
    | setting | any           | yes   | any             | no                              |
    | setting | metric, mode  | no    | no              | no                              |
    | setting | metric, mode  | no    | yes             | yes                             |
    | setting | other rules   | no    | any             | yes                             |
    """
    if source != "setting":
        return True
    if whole_job:
        return False
    return keep_best_given or name not in ("metric", "mode")


def rules_of(c: Config, flags: Mapping[str, object] | None = None, *, whole_job: bool = False) -> retention.Rules:
    """The rules of this prune; `flags`: the retention values given on the command line (None:
    every explicit setting counts as given there)."""

    def source(name: str) -> Source:
        if flags is not None and flags.get(name) is not None:
            return "flag"
        if name not in c.explicit:
            return "default"
        return "flag" if flags is None else "setting"

    keep_best_given = c.keep_best is not None and rule_used(source("keep_best"), "keep_best", whole_job, True)
    values = {name: getattr(c, name) for name in RULES if rule_used(source(name), name, whole_job, keep_best_given)}
    return retention.Rules(**values)  # type: ignore[arg-type]  # each field as Config holds it


def main(c: Config, args: argparse.Namespace) -> int:
    flags = {name: getattr(args, name, None) for name in RULES}
    try:
        rules = rules_of(c, flags, whole_job=args.all)
    except ValueError as e:
        return show.fail(str(e), exits.CONFIG)
    if "job_id" not in c.explicit:
        what = "--all needs --job J: which job to delete?" if args.all else "prune needs --job J: which job?"
        return show.fail(what, exits.CONFIG)
    if args.all and any(v is not None for v in flags.values()):
        return show.fail("--all deletes the whole job: it takes no --keep-* rule", exits.CONFIG)
    if not args.all and rules.empty:
        return show.fail(str(retention.NoRules()) + ", or --all to delete the whole job", exits.CONFIG)
    import uvloop

    from daemon.commands.common import storage_for

    async def go() -> int:
        async with storage_for(c) as storage:
            try:
                project = await browse.project_of(storage, c.job_id, c.project)
                if project is None:
                    return show.fail(f"job {c.job_id!r} not found in {storage.url}")
                if args.all:
                    return await _whole_job(storage, project, c.job_id, args)
                return await _by_rules(storage, project, c.job_id, rules, args)
            except (browse.AmbiguousJob, browse.MissingMetric) as e:
                return show.fail(str(e))
            except StorageError as e:
                return show.fail(f"prune of job {c.job_id!r} stopped: {e}; run it again to finish")

    try:
        return uvloop.run(go())
    except KeyboardInterrupt:
        # Whatever it stopped, its records say; the report would read as finished, so none.
        print(INTERRUPTED, file=sys.stderr)
        return exits.signalled(signal.SIGINT)


async def _by_rules(storage: Storage, project: str, job_id: str, rules: retention.Rules, args: Any) -> int:
    found = await prune.survey(storage, project, job_id)
    if found.being_deleted:
        return show.fail(f"job {job_id!r} is being deleted (an earlier prune --all stopped); finish with --all --yes")
    decisions = retention.plan(found.checkpoints, rules, stored_ranks=found.stored_ranks)  # MissingMetric
    report = _report(project, job_id, rules, decisions, found, dry_run=not args.yes)
    if not args.yes:
        _print(report, rules, args.json)
        return exits.PLANNED if report["to_delete"] or report["interrupted"] else exits.OK
    deleted: list[dict[str, Any]] = []

    def done(freed: prune.Freed, decision: retention.Decision | None) -> None:
        deleted.append(
            {
                "checkpoint": freed.checkpoint,
                "ranks": freed.ranks,
                "files": freed.files,
                "bytes": freed.bytes,
                "interrupted": decision is None,
            }
        )

    pruner = prune.Pruner(storage, project, job_id, deadline=_deadline(), multi_node=found.multi_node)
    try:
        await prune.execute(pruner, found, decisions, done)
    except StorageError:  # what was deleted before a failure is reported too; not on a cancel
        _finished(report, deleted, rules, args.json)
        raise
    _finished(report, deleted, rules, args.json)
    return exits.OK


def _finished(report: dict[str, Any], deleted: list[dict[str, Any]], rules: retention.Rules, as_json: bool) -> None:
    report["deleted"] = deleted
    report["bytes_freed"] = sum(d["bytes"] for d in deleted)
    _print(report, rules, as_json)


def _deadline() -> Deadline:
    return Deadline.after(RETRY_SECONDS)


def _report(
    project: str,
    job_id: str,
    rules: retention.Rules,
    decisions: list[retention.Decision],
    found: prune.Survey,
    *,
    dry_run: bool,
) -> dict[str, Any]:
    rows = [_row(d, rules) for d in decisions]
    deleting = [r for r in rows if r["action"] == "delete"]
    interrupted = [
        prune.describe_record(record, found.action(record, now))
        | {"bytes": found.interrupted_bytes.get((record.rank, record.checkpoint), 0)}
        for record, now in found.interrupted
    ]
    return {
        "project": project,
        "job_id": job_id,
        "rules": rules.describe(),
        "dry_run": dry_run,
        "checkpoints": rows,
        "interrupted": interrupted,
        "to_delete": len(deleting),
        "bytes_to_free": sum(r["bytes"] or 0 for r in deleting) + sum(i["bytes"] for i in interrupted),
    }


def _row(d: retention.Decision, rules: retention.Rules) -> dict[str, Any]:
    c = d.checkpoint
    return {
        "checkpoint": d.name,
        "step": c.step if c is not None else parse_step(d.name),
        "metric": c.metric(rules.metric) if c is not None and rules.metric else None,
        "bytes": c.total_bytes if c is not None else None,
        "files": c.file_count if c is not None else None,
        "ranks": c.ranks if c is not None else [],
        "committed_at": c.committed_at if c is not None else None,
        "action": "keep" if d.keep else "delete",
        "reasons": list(d.reasons),
        "uncommitted_ranks": list(d.uncommitted_ranks),
    }


def _print(report: dict[str, Any], rules: retention.Rules, as_json: bool) -> None:
    if as_json:
        show.print_json(report)
        return
    rows = [
        {**r, "size": show.human_bytes(r["bytes"]), "why": ", ".join(r["reasons"]) or "; ".join(rules.not_kept())}
        for r in report["checkpoints"]
    ]
    columns = [("checkpoint", "CHECKPOINT"), ("step", "STEP")]
    columns += [("metric", rules.metric.upper())] if rules.metric else []
    columns += [("size", "SIZE"), ("action", "ACTION"), ("why", "WHY")]
    show.print_table(rows, columns, title=f"prune plan for job {report['job_id']} ({report['project']})")
    for record in report["interrupted"]:
        what = "finished with --yes" if record["action"] == prune.FINISH else "only its record goes with --yes"
        show.write_out(f"interrupted prune of {record['checkpoint']} on rank {record['rank']}: {what}\n")
    if "deleted" not in report:
        free = show.human_bytes(report["bytes_to_free"])
        show.write_out(f"would delete {report['to_delete']} checkpoint(s), {free}; nothing deleted without --yes\n")
        return
    for d in report["deleted"]:
        what = "finished interrupted prune of" if d["interrupted"] else "deleted"
        ranks = ",".join(map(str, d["ranks"]))
        show.write_out(f"{what} {d['checkpoint']} (rank {ranks}): {d['files']} files, {show.human_bytes(d['bytes'])}\n")
    show.write_out(f"freed {show.human_bytes(report['bytes_freed'])} ({report['bytes_freed']} bytes)\n")


def live_ranks(statuses: list[dict[str, Any]]) -> list[int]:
    """The ranks whose status says their `ckptd run` is still going (and so still uploading and
    committing: deleting under it leaves committed checkpoints with files missing).

    | rank status | live |
    |-------------|------|
    | RUNNING     | yes  |
    | COMPLETED   | no   |
    | FAILED      | no   |
    | STOPPED     | no   |
    """
    return sorted(s["rank"] for s in statuses if s["status"] == jobmeta.RUNNING)


async def _statuses(storage: Storage, project: str, job_id: str) -> list[dict[str, Any]]:
    try:
        return (await jobmeta.read_job(storage, project, job_id))["ranks"]
    except jobmeta.JobNotFound:  # no metadata at all: nothing says it runs
        return []


async def _whole_job(storage: Storage, project: str, job_id: str, args: Any) -> int:
    if args.yes and not args.force:
        live = live_ranks(await _statuses(storage, project, job_id))
        if live:
            ranks = ",".join(map(str, live))
            return show.fail(
                f"job {job_id!r} is still running (rank {ranks}): its daemon would go on storing checkpoints; "
                "stop it first, or add --force when the daemon is known dead"
            )
    report: dict[str, Any] = {"project": project, "job_id": job_id, "all": True, "dry_run": not args.yes}
    files = size = 0
    async for info in storage.list(layout.job_prefix(project, job_id)):
        files, size = files + 1, size + info.size
    report.update(files=files, bytes=size)
    if args.yes:
        freed = await prune.Pruner(storage, project, job_id, deadline=_deadline()).delete_job()
        report.update(deleted_files=freed.files, bytes_freed=freed.bytes)
    if args.json:
        show.print_json(report)
    elif args.yes:
        show.write_out(f"deleted job {job_id} ({project}): {freed.files} objects, {show.human_bytes(freed.bytes)}\n")
    else:
        total = f"{files} objects, {show.human_bytes(size)}"
        show.write_out(f"would delete job {job_id} ({project}): {total}; nothing deleted without --yes\n")
    if not args.yes:
        return exits.PLANNED if files else exits.OK
    return exits.OK
