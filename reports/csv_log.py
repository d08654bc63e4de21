"""Crash-tolerant CSV logging for benchmark workers.

Each pytest-xdist worker appends to its own part file, so no locking is
needed; the parts are merged into one results file at the end of the run.
The writer syncs after every test and the reader skips a torn last line,
so a worker that dies loses at most the test it was running.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from reports.schema import CSV_COLUMNS, OPTIONAL_COLUMNS, STATUSES, format_cell, parse_bool

# The csv module ends records with \r\n; we read and write with newline=""
# so that the module, not the platform, controls line endings.
_HEADER_LINE = ",".join(CSV_COLUMNS)


def _row_cells(row: Mapping[str, object]) -> list[str]:
    """Order one row's values by the contract, rejecting misspelt columns."""
    for key in row:
        if key not in CSV_COLUMNS:
            raise ValueError(f"unknown results column {key!r}; expected one of {CSV_COLUMNS}")
    return [format_cell(row.get(column)) for column in CSV_COLUMNS]


def _write_csv(handle, rows: Iterable[Mapping[str, object]], with_header: bool) -> int:
    # Format every row before writing any, so a bad key cannot leave a
    # half-written test behind in the file.
    cells = [_row_cells(row) for row in rows]
    writer = csv.writer(handle)
    if with_header:
        writer.writerow(CSV_COLUMNS)
    writer.writerows(cells)
    return len(cells)


class PartWriter:
    """Appends rows to one worker's part file, durably, one test at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write_rows(self, rows: Iterable[Mapping[str, object]]) -> None:
        """Append all rows of one test in one write, then flush them to disk. A write cut short
        all the same (a full disk, a kill inside the system call) leaves the test without its
        last rows; whole_attempts() tells such a test by its missing primary row, which the
        session writes last."""
        is_new, torn_tail = self._inspect_existing()
        block = io.StringIO(newline="")
        if torn_tail:
            # A writer killed mid-line left no line ending; without one our
            # first row would be glued onto the torn fragment and lost too.
            block.write("\r\n")
        _write_csv(block, rows, with_header=is_new)
        data = block.getvalue().encode("utf-8")
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = 0
            while written < len(data):
                written += os.write(descriptor, data[written:])
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def _inspect_existing(self) -> tuple[bool, bool]:
        """Return (file is new or empty, file ends in a torn line)."""
        try:
            with open(self.path, "rb") as raw:
                first_line = raw.readline()
                if not first_line:
                    return True, False
                raw.seek(-1, os.SEEK_END)
                last_byte = raw.read(1)
        except FileNotFoundError:
            return True, False
        if first_line.decode("utf-8", "replace").rstrip("\r\n") != _HEADER_LINE:
            raise ValueError(f"{self.path} exists with a different header; refusing to append")
        return False, last_byte not in (b"\n", b"\r")


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Read a results CSV into dicts keyed by the contract's columns.

    Records with the wrong number of fields (a worker killed mid-write) are
    dropped with a warning; a file whose header is not ours is an error.
    Columns outside the contract are ignored.
    """
    path = Path(path)
    try:
        # utf-8-sig: a file re-saved by a spreadsheet may start with a BOM,
        # which would otherwise hide the first column name.
        with open(path, newline="", encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 text file ({error.reason})") from error
    # StringIO with newline="" splits records only at \r and \n, as the csv
    # module expects; str.splitlines would also split at form feeds etc.
    records = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(records, None)
        if header is None:
            raise ValueError(f"{path}: file is empty, expected a results CSV header")
        missing = [column for column in CSV_COLUMNS if column not in header and column not in OPTIONAL_COLUMNS]
        if missing:
            raise ValueError(f"{path}: not a results CSV, header lacks columns {missing}")
        rows = []
        last_record_kept = False
        for cells in records:
            if cells == []:
                continue  # blank line
            last_record_kept = len(cells) == len(header)
            if not last_record_kept:
                _warn_dropped(path, records.line_num, f"it has {len(cells)} fields, not {len(header)}")
                continue
            rows.append(dict(zip(header, cells)))
    except csv.Error as error:
        raise ValueError(f"{path}: malformed CSV at line {records.line_num}: {error}") from error
    # Our writer ends every record with a newline, so a file that does not
    # end in one was cut mid-record. A cut inside the last field (status)
    # keeps the field count right, but leaves no valid status behind.
    torn = not text.endswith(("\n", "\r"))
    if torn and last_record_kept and rows[-1]["status"] not in STATUSES:
        _warn_dropped(path, records.line_num, "it is unterminated and has no valid status")
        rows.pop()
    return [{column: row.get(column, OPTIONAL_COLUMNS.get(column)) for column in CSV_COLUMNS} for row in rows]


def _warn_dropped(path: Path, line: int, reason: str) -> None:
    # stacklevel=3 points the warning at read_rows' caller.
    warnings.warn(f"{path}: line {line}: dropping record, probably truncated: {reason}", stacklevel=3)


def read_parts(part_paths: Sequence[str | os.PathLike[str]]) -> tuple[list[dict[str, str]], list[str]]:
    """The rows of every readable part, in the given order, and one problem line for each part
    or record skipped. A part that is empty (a worker killed right after creating it), not ours
    or not CSV at all loses only itself: the other workers' rows still make the results."""
    rows: list[dict[str, str]] = []
    problems: list[str] = []
    for part in part_paths:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if os.path.getsize(part) == 0:
                    problems.append(f"{part}: empty part file skipped")
                    continue
                rows.extend(read_rows(part))
            except (OSError, ValueError) as error:
                problems.append(f"{part}: part skipped: {error}")
        problems.extend(str(warning.message) for warning in caught)
    return rows, problems


def latest_attempts(rows: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Each test once: the rows of its latest recorded attempt, in reading order.

    A test is recorded more than once in one run directory when a resumed run re-runs what
    failed or crashed before, or when its worker died after writing the rows and the main
    process then recorded the crash. The latest attempt (by timestamp, then by reading order)
    is the one the run stands by."""
    def test_key(row: Mapping[str, str]) -> tuple[str, str]:
        return row["test_id"], row["config_hash"]

    def attempt(row: Mapping[str, str]) -> tuple[str, ...]:
        return row["run_id"], row["worker"], row["timestamp"], row["status"]

    latest: dict[tuple[str, str], tuple[tuple[str, int], tuple[str, ...]]] = {}
    for position, row in enumerate(rows):
        rank = (row["timestamp"], position)
        if test_key(row) not in latest or rank >= latest[test_key(row)][0]:
            latest[test_key(row)] = (rank, attempt(row))
    kept, seen = [], set()
    for row in rows:
        metric_key = (*test_key(row), row["metric"])
        if attempt(row) == latest[test_key(row)][1] and metric_key not in seen:
            seen.add(metric_key)
            kept.append(dict(row))
    return kept


def whole_attempts(rows: Sequence[Mapping[str, str]]) -> tuple[list[dict[str, str]], list[str]]:
    """The rows of every whole attempt, and one problem line per torn one.

    An attempt (one test, run id, worker and timestamp) with metric rows is whole only when its
    primary row is among them: a test's rows are appended in one write that ends with the
    primary row, so a part cut inside that write (a killed worker, a full disk) keeps the first
    metrics and loses it. A torn attempt must not count as passed (--resume would never run it
    again) nor stand in the results with metrics missing. A bare row (a failure before any
    metric) is whole by itself."""
    def attempt(row: Mapping[str, str]) -> tuple[str, ...]:
        return row["test_id"], row["config_hash"], row["run_id"], row["worker"], row["timestamp"]

    has_primary: dict[tuple[str, ...], bool] = {}
    counts: Counter = Counter()
    for row in rows:
        key = attempt(row)
        counts[key] += 1
        has_primary[key] = has_primary.get(key, False) or not row["metric"] or parse_bool(row["primary"]) is True
    torn = [key for key, whole in has_primary.items() if not whole]
    problems = [f"{test_id}: attempt of run {run_id or '?'} on {worker or '?'} has {counts[key]} metric row(s) "
                f"and not its primary one (cut while written): left out; --resume runs it again"
                for key in torn for test_id, _hash, run_id, worker, _when in [key]]
    return [dict(row) for row in rows if has_primary[attempt(row)]], problems


def merge_parts(part_paths: Sequence[str | os.PathLike[str]], out_path: str | os.PathLike[str]) -> int:
    """Concatenate part files (in the given order) into out_path, atomically.

    The merged file is written beside out_path and renamed over it, so a
    reader sees either the old file or the complete new one, never a mix.
    Returns the number of rows written.
    """
    rows = []
    for part in part_paths:
        # A worker killed right after creating its part leaves it empty;
        # that loses nothing, so it should not fail the whole merge.
        if os.path.getsize(part) == 0:
            warnings.warn(f"{part}: empty part file skipped", stacklevel=2)
            continue
        rows.extend(read_rows(part))
    return write_results(rows, out_path)


def write_results(rows: Sequence[Mapping[str, object]], out_path: str | os.PathLike[str]) -> int:
    """Write a whole results file atomically (temp file beside it, then rename); the row count."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory: os.replace is only atomic within one filesystem.
    handle = tempfile.NamedTemporaryFile(
        "w",
        dir=out_path.parent,
        prefix=f".{out_path.name}.",
        suffix=".tmp",
        delete=False,
        newline="",
        encoding="utf-8",
    )
    try:
        with handle:
            count = _write_csv(handle, rows, with_header=True)
            handle.flush()
            os.fsync(handle.fileno())
        # Temporary files are created owner-only; a results file is meant to
        # be shared (CI artifacts, other users), so give it ordinary rights.
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, out_path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return count
