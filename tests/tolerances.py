"""The tests' one table of float tolerances, by dtype, device and float path.

A test that compares a float result with an independent reference says what it compares (the result's dtype, the
device it ran on, how long the float path is) and reads rtol/atol here instead of carrying literals. A test that can
hold a tighter bound passes it explicitly; a looser one than the table is refused, so the table is an upper bound.
"""

import torch

# (rtol, atol) per float path:
#   "op"      a few elementwise ops or one small reduction, computed in another order than the reference
#   "net"     a forward (and backward) through a network of several layers: rounding accumulated over depth
#   "kernel"  a Triton kernel against a torch reference: block accumulation order; on a GPU tl.dot may use tf32
_FLOAT64 = {"op": (1e-12, 1e-15), "net": (1e-9, 1e-12)}
_TABLE = {
    (torch.float64, "cpu"): _FLOAT64,
    (torch.float64, "cuda"): _FLOAT64,
    (torch.float32, "cpu"): {"op": (1e-5, 1e-6), "net": (1e-4, 1e-5), "kernel": (1e-4, 1e-4)},
    (torch.float32, "cuda"): {"op": (1e-5, 1e-6), "net": (1e-4, 1e-5), "kernel": (3e-3, 3e-3)},
    (torch.float16, "cpu"): {"kernel": (2e-3, 2e-3)},
    (torch.float16, "cuda"): {"kernel": (2e-3, 2e-3)},
    (torch.bfloat16, "cpu"): {"kernel": (2e-2, 2e-2)},
    (torch.bfloat16, "cuda"): {"kernel": (2e-2, 2e-2)},
}


def tol(dtype, device="cpu", path="op", rtol=None, atol=None):
    """The table's ``dict(rtol=, atol=)`` for a result of ``dtype`` on ``device`` along ``path``; ``rtol``/``atol``
    tighten it (a value looser than the table raises, so no test can quietly relax the table)."""
    device = torch.device(device).type
    try:
        table_rtol, table_atol = _TABLE[(dtype, device)][path]
    except KeyError:
        raise KeyError(f"no tolerance for {dtype} on {device} along {path!r}: add a row to tests/tolerances.py") \
            from None
    for name, given, bound in (("rtol", rtol, table_rtol), ("atol", atol, table_atol)):
        if given is not None and given > bound:
            raise ValueError(f"{name}={given} is looser than the table's {bound} for {dtype} on {device} ({path})")
    return dict(rtol=table_rtol if rtol is None else rtol, atol=table_atol if atol is None else atol)


def assert_close(actual, expected, path="op", dtype=None, scaled=False, rtol=None, atol=None, msg=None):
    """Assert ``actual`` equals ``expected`` within the table's tolerance for ``dtype`` (default: ``actual``'s own)
    on ``actual``'s device. ``scaled`` multiplies atol by the reference's largest magnitude (at least 1), for outputs
    whose rounding grows with their size. Both sides are compared in float64 so that a float64 reference may check
    a float32 result."""
    bound = tol(dtype or actual.dtype, actual.device, path, rtol=rtol, atol=atol)
    if scaled:
        bound["atol"] *= max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double().to(actual.device), **bound, msg=msg)
