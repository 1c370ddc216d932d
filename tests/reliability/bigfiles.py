"""Multi-GiB uploads interrupted: a pod-style shutdown, and SIGKILL mid-multipart (the acceptance
figure: the resumed upload re-sends at most the parts that were in flight at the kill).

The full run uses a 2 GiB file on the JuiceFS gateway (on disk, unlike moto's memory); the short
run a few dozen MiB on moto, slowed by a bandwidth cap so that the interruption lands mid-upload.
"""

from __future__ import annotations

import signal

from reliability.harness import Trial

MiB, GiB = 1 << 20, 1 << 30
FLIGHT = 4


def _setup(t: Trial, full: bool) -> tuple[int, int, tuple[str, ...]]:
    size, part = (2 * GiB, 16 * MiB) if full else (40 * MiB, 5 * MiB)
    extra = ("--multipart-threshold", "5MiB", "--part-size", f"{part // MiB}MiB", "--parts-in-flight", str(FLIGHT))
    if not full:
        extra += ("--bandwidth-limit", "12MiB")
    return size, part, extra


def _parts_stored(t: Trial) -> int:
    return sum(1 for r in t.store.proxy.requests("UploadPart") if r.status == 200)


def pod_shutdown(t: Trial, full: bool) -> None:
    """SIGTERM mid-upload, a grace period, SIGKILL if still running; the next pod finishes the job."""
    size, part, extra = _setup(t, full)
    t.watch(*extra, "--drain-timeout", "600")
    t.wait_writer(t.writer({"mode": "big", "size": size}), timeout=300)
    total = -(-size // part)
    t.until(lambda: _parts_stored(t) >= t.rng.randint(1, total * 2 // 3), 300, "parts stored")
    d = t.daemons[-1]
    d.signal(signal.SIGTERM)
    t.faults["sigterm"] += 1
    rc = d.wait(t.rng.uniform(1, 10 if full else 3))  # the pod's grace period
    if rc is None:
        t.kill_daemon()
    else:
        t.exit_codes.append(rc)
    t.watch(*extra)
    t.drain(timeout=600)


def multipart_resume(t: Trial, full: bool) -> None:
    """SIGKILL mid-multipart (2 GiB, 16 MiB parts, 4 in flight): the restart re-sends at most the
    parts that were in flight, never one already stored."""
    size, part, extra = _setup(t, full)
    t.watch(*extra, "--drain-timeout", "600")
    t.wait_writer(t.writer({"mode": "big", "size": size}), timeout=300)
    total = -(-size // part)
    t.until(lambda: _parts_stored(t) >= t.rng.randint(max(1, total // 5), total * 2 // 3), 300, "parts stored")
    t.kill_daemon()
    before = t.store.proxy.requests("UploadPart")
    done = {r.query["partNumber"] for r in before if r.status == 200}
    in_flight = {r.query["partNumber"] for r in before if r.status is None} - done
    second = t.watch(*extra, "--drain-timeout", "600")
    t.drain(timeout=600)
    after = t.store.proxy.requests("UploadPart")[len(before) :]
    t.notes.append(f"parts stored {sorted(done, key=int)}, in flight {sorted(in_flight, key=int)}, "
                   f"sent after the restart {[r.query['partNumber'] for r in after]}")  # fmt: skip
    resent = {r.query["partNumber"] for r in after} & (done | in_flight)
    resent_bytes = sum(r.sent for r in after if r.query["partNumber"] in resent)
    t.figures.update(parts=total, parts_stored_at_kill=len(done), parts_in_flight_at_kill=len(in_flight),
                     parts_resent=len(resent), bytes_resent=resent_bytes)  # fmt: skip
    if not second.events("multipart upload resumed"):
        t.violations.append("resume: the restarted daemon did not resume the multipart upload")
    if resent & done:
        t.violations.append(f"resume: {len(resent & done)} part(s) stored before the kill were sent again")
    if len(resent) > len(in_flight) or len(in_flight) > FLIGHT:
        t.violations.append(f"resume: {len(resent)} parts re-sent, {len(in_flight)} in flight (limit {FLIGHT})")
