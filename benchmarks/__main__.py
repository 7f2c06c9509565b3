"""``python -m benchmarks``: run the suite (see ``benchmarks/run.py``)."""

from benchmarks.run import main

raise SystemExit(main())
