"""The launcher's lease on its output: one run at a time per folder.

The lease itself (the exclusive section, renewal, judging a holder, and the
renewal by a distributed job's workers) is `transforms/common/lease.py`, so
that the stages can renew it without importing the launcher; this module is
the launcher's name for it (`held` in `pipeline/launch.py`, `Lease` in
`pipeline/tools/store.py`).
"""
from transforms.common.lease import (  # noqa: F401  (the launcher's names for them)
    LEASE,
    Lease,
    LeaseHeld,
    LeaseLost,
    LeaseRef,
    _write_if_generation,
    held,
)
