"""``python -m loadtest.workloads [NAME|PATH ...]``: list or summarize workloads."""

import sys

from loadtest.workloads.catalog import main

sys.exit(main(sys.argv[1:]))
