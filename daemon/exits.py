"""Exit codes, in one place (SPEC §5): what `ckptd` tells the shell, Kubernetes and CI.

| code    | meaning                                                              |
|---------|----------------------------------------------------------------------|
| 0       | success (`run`: the trainer's 0 and every file stored)               |
| 1       | a browsing command failed: an unknown project, job or checkpoint, a store error |
| 2       | configuration error: nothing was started                             |
| 3       | a required restore failed: training was not started                  |
| 4       | not every complete file was stored (`run`: though training succeeded) |
| 5       | `prune` without `--yes`: the plan would delete checkpoints; nothing was deleted |
| 126/127 | a start command could not be executed / was not found (the shell's)  |
| 128+N   | the trainer died of signal N, or ckptd was stopped by it             |
| other   | the trainer's own exit code                                          |
"""

from __future__ import annotations

OK = 0
FAILED = 1
CONFIG = 2
RESTORE = 3
NOT_STORED = 4
PLANNED = 5
NOT_EXECUTABLE = 126
NOT_FOUND = 127


def signalled(signum: int) -> int:
    """The shell's code for a process ended by signal `signum`."""
    return 128 + signum


def of_process(returncode: int) -> int:
    """A child's end as the shell reports it, which `ckptd run` passes on.

    | returncode | exit status | meaning                 |
    |------------|-------------|-------------------------|
    | 0          | 0           | success                 |
    | 3          | 3           | the trainer's own code  |
    | -9         | 137         | killed by SIGKILL (9)   |
    | -15        | 143         | terminated by SIGTERM   |
    """
    return signalled(-returncode) if returncode < 0 else returncode


def of_run(trainer_status: int, stored_all: bool) -> int:
    """`ckptd run`'s exit code from the trainer's and the drain's outcome.

    | trainer status | stored all | exit | why                                           |
    |----------------|------------|------|-----------------------------------------------|
    | 0              | yes        | 0    | all good                                      |
    | 0              | no         | 4    | training worked, its checkpoints are not safe |
    | 3              | yes        | 3    | the trainer's own failure                     |
    | 3              | no         | 3    | the trainer's failure is the first news       |
    | 137            | any        | 137  | killed by signal 9                            |
    """
    return NOT_STORED if trainer_status == OK and not stored_all else trainer_status


def of_watch(stored_all: bool) -> int:
    return OK if stored_all else NOT_STORED
