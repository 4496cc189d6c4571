"""``python -m fedsilo.benchmarks.deployment_overhead --probe DEPARTMENT_CSV TEST_CSV``: the fresh-interpreter probe."""

import sys

from .probe import main

sys.exit(main())
