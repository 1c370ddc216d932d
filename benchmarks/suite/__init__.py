"""The benchmark suite of issue 13: ckptd against s5cmd (defaults and tuned) and the AWS CLI on the
checkpoints a trainer actually leaves (dirty in the page cache, renamed into a watched folder), on
restore, lag, interference with a training loop and scaling. One command runs it and writes
docs/benchmarks.md:

    .venv/bin/python -m benchmarks.suite                # everything, 3 interleaved rounds
    .venv/bin/python -m benchmarks.suite --quick        # tiny sizes, a smoke run
    .venv/bin/python -m benchmarks.suite --only 1,4 --rounds 5
"""
