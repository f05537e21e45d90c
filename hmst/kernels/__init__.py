"""Compute kernels with a pure-PyTorch reference beside each fast path."""

from hmst.kernels.scan import (  # noqa: F401
    BACKENDS,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
    selective_state_update,
)
