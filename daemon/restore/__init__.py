"""Restoring, before training: resolve each reference to a committed checkpoint, plan where its
files land, download and verify them (resolve.py → plan.py → download.py; restorer.py runs them)."""
