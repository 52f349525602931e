"""The one table formatter of every report (bench layers, bench step, compare, parity)."""


def align_rows(rows, right_from=None):
    """Text lines of a table of string rows: columns padded to their widest cell (right-aligned
    from column ``right_from`` on, for numbers), a rule under the first (header) row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def cell(i, c, w):
        return c.rjust(w) if right_from is not None and i >= right_from else c.ljust(w)
    lines = ["  ".join(cell(i, c, w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return lines
