"""Range checks of the numeric options of reward-side constructors, with the class and parameter named.

A NaN passes every comparison-based check (``nan <= 0`` is False): a NaN weight then drops its
reward from ``nansum``, a NaN timeout times every sample out, and an infinity overflows later
inside ``threading`` or ``setrlimit``. Every numeric option of the reward classes goes through
``check_finite``, which tests finiteness before the range, so the error arrives at construction::

    ValueError: RewardSet: timeout=nan is invalid: must be a finite number in (0, 2147483647] or None

It mirrors the finite-float rule of ``rftlab.core.arguments`` (which ``rewards`` may not import).
Standard library only, and no import of rftlab: ``sandbox.py`` must run as a lone file under a bare
system Python, with this file beside it.
"""

from __future__ import annotations

import math
import numbers
import threading
from typing import Any

#: The longest timeout, in seconds, that every waiting primitive of the reward side accepts:
#: thread joins and lock acquires (``threading.TIMEOUT_MAX``) and ``signal.alarm`` (a C int, which
#: math-verify uses). A longer one would raise OverflowError at the first call, not at construction.
MAX_SECONDS = float(min(threading.TIMEOUT_MAX, 2**31 - 1))


def check_finite(
    owner: str,
    name: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    integer: bool = False,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> None:
    """Raise ``ValueError("<owner>: <name>=<value> is invalid: must be ...")`` unless ``value`` is a
    finite real number (never a bool) within the bounds.

    Args:
        owner: the class named first in the message (``type(self).__name__``).
        name: the parameter, as the user wrote it (``"weights[1]"`` for an element).
        value: the value given.
        gt: exclusive lower bound.
        ge: inclusive lower bound.
        le: inclusive upper bound.
        integer: require an integer (``numbers.Integral``).
        allow_none: accept None (the option's "off" value).
        allow_inf: accept ``+inf`` (an upper limit that means "no limit").
    """
    if _accepts(value, gt=gt, ge=ge, le=le, integer=integer, allow_none=allow_none, allow_inf=allow_inf):
        return
    allowed = _describe(gt=gt, ge=ge, le=le, integer=integer, allow_none=allow_none, allow_inf=allow_inf)
    raise ValueError(f"{owner}: {name}={value!r} is invalid: must be {allowed}")


def _accepts(value: Any, *, gt: float | None, ge: float | None, le: float | None, integer: bool, allow_none: bool,
             allow_inf: bool) -> bool:
    if value is None:
        return allow_none
    # bool is an Integral, but True as a timeout or a size is a mistake, as in rftlab.core.arguments.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        return False
    if allow_inf and value == math.inf:
        return True
    # math.isfinite would overflow on a huge int; every int is finite.
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
        return False
    return (gt is None or value > gt) and (ge is None or value >= ge) and (le is None or value <= le)


def _describe(*, gt: float | None, ge: float | None, le: float | None, integer: bool, allow_none: bool,
              allow_inf: bool) -> str:
    """What is allowed, in words: "a finite number in (0, 2147483647] or None"."""
    text = "an integer" if integer else "a finite number"
    low = f"({_number(gt)}" if gt is not None else f"[{_number(ge)}" if ge is not None else None
    if low is not None and le is not None:
        text += f" in {low}, {_number(le)}]"
    elif low is not None:
        text += f" {'>' if gt is not None else '>='} {low[1:]}"
    elif le is not None:
        text += f" <= {_number(le)}"
    return text + (" or inf" if allow_inf else "") + (" or None" if allow_none else "")


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)
