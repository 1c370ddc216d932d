"""Uploading, alongside training: every completed file of the checkpoint folder reaches the store.

One file's way through the package, a module per step:

    detect.py      inotify (or polling) hints that a file may be complete; scans catch what events miss
    complete.py    the rule: closed or renamed, not open for writing, unchanged for the settle time
    settle.py      candidates wait here until the rule says complete
    pin.py         a hard link into staging, so rotation cannot take the file away
    queue.py       one entry per path, a lane for small files
    transfer.py    single PUT or parallel multipart, SHA-256 in one pass (throttle.py caps bandwidth)
    worker.py      takes jobs off the queue, records what was stored, reports failures
    journal.py     the durable record of pins, multipart uploads and stored files
    recover.py     start-up: adopt pins, resume or abort multipart uploads, reconcile with the store
    commit.py      when a checkpoint is committed (pure rules)
    publish.py     writes commit manifests and job metadata
    engine.py      wires the steps together: startup, drain, shutdown
"""
