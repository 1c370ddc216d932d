"""Uploading, alongside training: every completed file of the checkpoint folder reaches the store.

One file's way through the package, a module per step:

    detect.py      inotify (inotify.py) or polling hints that a file may be complete
    scan.py        walks the folder: at start, periodically and at drain, the truth the hints miss
    complete.py    the rule: closed or renamed, not open for writing, unchanged for the settle time
    settle.py      candidates wait here until the rule says complete
    intake.py      what settles is queued, unless this very version is stored or on its way
    pin.py         a hard link into staging (statedir.py), so rotation cannot take the file away
    queue.py       one entry per path, a lane for small files; failed jobs wait for the next scan
    worker.py      takes jobs off the queue, uploads (transfer.py, throttle.py), records the result
    journal.py     the durable record of pins, multipart uploads and stored files
    recover.py     start-up: adopt pins, resume or abort multipart uploads, reconcile with the store
    commit.py      when a checkpoint is committed (pure rules)
    publish.py     writes commit manifests and job metadata

    engine.py      builds the steps, passes each its collaborators, starts (tasks.py) and drains them
    health.py      the store as uploads see it; status.py: /status, /readyz and the backlog gauges
    diskpressure.py  opt-in: removes local copies of older committed checkpoints when the disk fills
"""
