"""One range check for the numbers a user gives: the command line's flags, the trainer's
settings and the reuse strategies' options are checked by the same rule and refused in
the same words ("... must be a finite number in [0, 1), got 1.5")."""
import math

import numpy as np


def describe_range(low=None, high=None, open_low=False, open_high=False, integer=False):
    """What a range accepts, in words: 'a positive integer', 'a finite number in (0, 1]', ..."""
    if integer:
        if high is None and low is not None and low == 1 and not open_low:
            return "a positive integer"
        kind = "an integer"
    else:
        if high is None and low == 0 and open_low:
            return "a positive finite number"
        kind = "a finite number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    if low is not None:
        return f"{kind} {'>' if open_low else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if open_high else '<='} {high}"
    return kind


def in_range(value, low=None, high=None, open_low=False, open_high=False, integer=False):
    """True when ``value`` is a number (an int where ``integer``; never a bool), finite, and
    within the bounds (None: unbounded; open_*: the bound itself is excluded)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if integer:
        if not isinstance(value, (int, np.integer)):
            return False
    elif not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        return False
    if low is not None and not (value > low if open_low else value >= low):
        return False
    return bool(high is None or (value < high if open_high else value <= high))


def check_range(name, value, low=None, high=None, open_low=False, open_high=False, integer=False):
    """``value`` if it is in range (in_range), else ValueError naming ``name``, what the range
    accepts and what was given."""
    if not in_range(value, low, high, open_low, open_high, integer):
        raise ValueError(f"{name} must be {describe_range(low, high, open_low, open_high, integer)}, got {value!r}")
    return value
