"""A local server that implements the images contract faithfully, for tests and benchmarks.

Example (in-process)::

    from flux_async.emulator import Emulator, Fault

    async with Emulator(api_keys=["sk-test"], rate_limit=5) as emu:
        emu.script(Fault.status(503))  # the next request fails once
        ...  # point a client at emu.base_url ("http://127.0.0.1:<port>/v1")
        print(emu.stats.snapshot())

In another process: ``python -m flux_async.emulator --port 0`` prints
``READY http://127.0.0.1:<port>/v1`` and serves until SIGINT/SIGTERM.
"""

from ._faults import Fault, FaultRates
from ._server import Emulator
from ._stats import EmulatorStats, SeenRequest

__all__ = ["Emulator", "EmulatorStats", "Fault", "FaultRates", "SeenRequest"]
