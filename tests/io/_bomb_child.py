"""Child of tests/io/test_malformed.py: reads each file given on the command line with
flax_registry and prints, as JSON, `[exception type, message names the file, seconds, growth of
peak RSS in MB]` per file. A crash or hang ends the process (faulthandler prints where)."""

from __future__ import annotations

import faulthandler
import json
import resource
import sys
import time

from flax_registry.io import open_checkpoint


def main() -> None:
    faulthandler.enable()
    results = []
    for path in sys.argv[1:]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        faulthandler.dump_traceback_later(30, exit=True)
        try:
            with open_checkpoint(path) as reader:
                for key in reader:
                    reader.read(key)
            kind, names = "read", True
        except Exception as e:
            kind, names = type(e).__name__, path in str(e)
        faulthandler.cancel_dump_traceback_later()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        results.append([kind, names, round(time.perf_counter() - start, 3), round(grown / 1024, 1)])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
