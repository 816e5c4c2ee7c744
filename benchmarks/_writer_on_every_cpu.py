"""The library's writer process (``flux_async/_files.py``, run as a script as the library
runs it), started on every CPU the benchmark was given rather than on the one its client
thread is confined to (``bench_save.py``, "Where the processes run"): a thread's CPU
affinity passes to the processes it starts, and a client that was not confined would
have started its writer free to run anywhere.

Standard library only, and quick to start, like the writer itself::

    FLUX_BENCH_FILES=.../flux_async/_files.py FLUX_BENCH_CPUS=0,1 \\
        python -I -S _writer_on_every_cpu.py [--shared FD SIZE]
"""

import os

os.sched_setaffinity(0, {int(cpu) for cpu in os.environ["FLUX_BENCH_CPUS"].split(",")})
_path = os.environ["FLUX_BENCH_FILES"]
with open(_path, "rb") as _file:
    _code = compile(_file.read(), _path, "exec")
# As `python -I -S _files.py ARGS` runs it: sys.argv[1:] are the writer's own arguments.
exec(_code, {"__name__": "__main__", "__file__": _path})
