"""Read a CSV of image file names and labels, with an optional is_valid column that fixes the split.

The layout of fastai's `ColReader`/`ColSplitter` and of Kaggle's train.csv: a header line, then one row per image
naming its file and its label, and, where the split is fixed, whether the image is in the validation set. Every
refusal is one `LabelsCsvError` line naming the file, the row (its line number, the header being line 1) and the fix.
"""

from __future__ import annotations

import codecs
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lib.common.errors import InputError

# The spellings of a boolean accepted in the valid column, after stripping and lower-casing. "true"/"false" also
# covers what pandas' `DataFrame.to_csv` writes for a bool column (True/False).
VALID_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# Separators recognised in a one-column header, to tell the user the file is not comma-separated.
OTHER_SEPARATORS = {";": "semicolon", "\t": "tab"}
# Two errors of pandas' C tokenizer (pandas/_libs/src/parser/tokenizer.c, as in pandas 3.1.1): the first counts
# records from 1, the second from 0, blank lines included; other parser errors are passed on as pandas words them.
TOO_MANY_FIELDS = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
OPEN_QUOTE = re.compile(r"EOF inside string starting at row (\d+)")


class LabelsCsvError(InputError):
    """A labels CSV the pipeline cannot use: one line naming the file, the row and the fix."""


@dataclass(frozen=True)
class LabelRows:
    """The rows of a labels CSV, checked.

    table: one row per image, in file order, with columns fname (str, as written but stripped), label (str,
        stripped), row (int: its line number in the file, the header being line 1) and, only when the CSV has the
        valid column, is_valid (bool).
    duplicates: rows dropped because they repeat an earlier row exactly (same file, label and is_valid).
    """

    table: pd.DataFrame
    duplicates: int


def read_labels_csv(
    path: Path, *, fname_col: str = "fname", label_col: str = "label", valid_col: str = "is_valid"
) -> LabelRows:
    """Read and check a labels CSV.

    Args:
        path: the CSV, UTF-8 with or without a byte-order mark, comma-separated, with a header line.
        fname_col: the header of the column of file names.
        label_col: the header of the column of labels.
        valid_col: the header of the column saying whether a row is in the validation set; a CSV without it has no
            fixed split.

    Raises:
        LabelsCsvError: the file cannot be read, has no rows, lacks a column, has an empty file name or label, an
            is_valid value that is not a boolean, or names a file twice with different labels or is_valid.
    """
    path = Path(path)
    fname_col, label_col, valid_col = fname_col.strip(), label_col.strip(), valid_col.strip()
    if fname_col == label_col:
        raise LabelsCsvError(
            f"--fname-col and --label-col both name column {fname_col!r} of {path}: give two different columns."
        )
    records = _records(path, _text(path))
    header = [str(name).strip() for name in records.iloc[0]]
    columns = _column_positions(path, header, fname_col, label_col, valid_col)
    rows = _line_numbers(records)
    body = records.iloc[1:].apply(lambda cells: cells.str.strip())
    # A blank line, or one of separators only (Excel writes those below the data), is no row.
    blank = body.eq("").all(axis=1)
    table = pd.DataFrame(
        {
            "fname": body.iloc[:, columns[fname_col]],
            "label": body.iloc[:, columns[label_col]],
            "row": rows.iloc[1:],
        }
    )[~blank]
    if table.empty:
        raise LabelsCsvError(
            f"Labels CSV {path} has no rows below its header: add a row per image ({fname_col},{label_col})."
        )
    _refuse_empty(path, table, "fname", f"an empty file name{{more}}: write it in column {fname_col} or delete the row")
    _refuse_empty(path, table, "label", f"an empty label{{more}}: write it in column {label_col} or delete the row")
    if valid_col in columns:
        table["is_valid"] = _booleans(path, body.iloc[:, columns[valid_col]][~blank], table["row"], valid_col)
    repeats = table.drop(columns="row").duplicated()
    table = table[~repeats].reset_index(drop=True)
    _refuse_conflicts(path, table)
    return LabelRows(table=table, duplicates=int(repeats.sum()))


def _text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LabelsCsvError(f"Labels CSV {path} does not exist: pass the path of an existing CSV file.") from None
    except IsADirectoryError:
        raise LabelsCsvError(f"Labels CSV {path} is a folder: pass the path of the CSV file in it.") from None
    except OSError as error:
        raise LabelsCsvError(
            f"Labels CSV {path} cannot be read ({error.strerror}): make it readable or pass another file."
        ) from None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise LabelsCsvError(f"Labels CSV {path} is UTF-16 text, not UTF-8: save it as UTF-8 (Excel: CSV UTF-8).")
    try:
        # utf-8-sig drops the byte-order mark Excel's "CSV UTF-8" writes, which would otherwise join the first header.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise LabelsCsvError(
            f"Labels CSV {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} on line {line}): "
            "save it as UTF-8 (Excel: CSV UTF-8)."
        ) from None


def _read(text: str, nrows: int | None = None) -> pd.DataFrame:
    # header=None: the header is record 0, so that repeated column names are not renamed (pandas makes label.1 of a
    # second label). skip_blank_lines=False: every line is a record, so a record's line number can be counted.
    # keep_default_na=False: a label "NA" or "null" stays text, and a missing cell (a short row) reads as "".
    return pd.read_csv(
        io.StringIO(text), header=None, dtype=str, keep_default_na=False, skip_blank_lines=False, nrows=nrows
    )


def _records(path: Path, text: str) -> pd.DataFrame:
    if not text.strip():
        raise LabelsCsvError(f"Labels CSV {path} has no rows (it is empty): write a header line, then a row per image.")
    if not text.partition("\n")[0].strip():
        # pandas takes a blank first line for a header of one unnamed column, or finds no columns at all.
        raise LabelsCsvError(f"Labels CSV {path} starts with a blank line: delete the lines above its header.")
    try:
        return _read(text)
    except pd.errors.ParserError as error:
        raise LabelsCsvError(_parser_message(path, text, str(error).strip())) from None


def _parser_message(path: Path, text: str, error: str) -> str:
    if match := TOO_MANY_FIELDS.search(error):
        expected, record, saw = (int(n) for n in match.groups())
        line = _line_of_record(text, record - 1)
        return (
            f"{path}: row {line} has {saw} fields but the header has {expected}: quote a value that holds a comma "
            '("a,b.jpg"), or remove the extra commas.'
        )
    if match := OPEN_QUOTE.search(error):
        line = _line_of_record(text, int(match.group(1)))
        return f'{path}: row {line} opens a quote (") that never closes: close it, or remove the stray quote.'
    return f"Labels CSV {path} is not a CSV pandas can read ({error.splitlines()[0]}): save it as comma-separated text."


def _line_of_record(text: str, index: int) -> int:
    """The line on which the record at index (from 0, the header being 0) starts, from the records before it only."""
    if index == 0:
        return 1
    before = _read(text, nrows=index)  # the record at index is the one pandas cannot read
    return int(_line_numbers(before).iloc[-1] + 1 + _line_breaks(before).iloc[-1])


def _line_breaks(records: pd.DataFrame) -> pd.Series:
    """How many line breaks each record holds inside its quoted cells."""
    return sum(records[column].str.count("\n") for column in records.columns)


def _line_numbers(records: pd.DataFrame) -> pd.Series:
    """The line on which each record starts: record i on line 1 + i, plus the breaks in the records before it."""
    breaks = _line_breaks(records)
    return (1 + pd.Series(range(len(records)), index=records.index) + breaks.cumsum() - breaks).astype("int64")


def _column_positions(path: Path, header: list[str], fname_col: str, label_col: str, valid_col: str) -> dict[str, int]:
    for name in (fname_col, label_col, valid_col):
        where = [str(i + 1) for i, column in enumerate(header) if column == name]
        if len(where) > 1:
            raise LabelsCsvError(
                f"{path}: the header names column {name!r} {len(where)} times (columns {', '.join(where)}): "
                "rename all but one."
            )
    wanted = ((fname_col, "file name", "--fname-col"), (label_col, "label", "--label-col"))
    missing = [(name, what, option) for name, what, option in wanted if name not in header]
    if missing:
        names = " and ".join(repr(name) for name, _, _ in missing)
        has = ", ".join(repr(column) for column in header)
        whats = " and ".join(what for _, what, _ in missing)
        fix = f"name the {whats} column{'s' if len(missing) > 1 else ''} with {' and '.join(o for _, _, o in missing)}"
        if len(header) == 1:
            separator = next((word for sep, word in OTHER_SEPARATORS.items() if sep in header[0]), None)
            fix = f"it looks {separator}-separated, save it comma-separated" if separator else fix
        plural = "s" if len(missing) > 1 else ""
        raise LabelsCsvError(f"Labels CSV {path} has no column{plural} {names} (its columns: {has}): {fix}.")
    return {name: header.index(name) for name in (fname_col, label_col, valid_col) if name in header}


def _refuse_empty(path: Path, table: pd.DataFrame, column: str, what: str) -> None:
    empty = table[table[column].eq("")]
    if empty.empty:
        return
    first = empty.iloc[0]
    named = f" ({first['fname']})" if column != "fname" else f" (label {first['label']})" if first["label"] else ""
    raise LabelsCsvError(f"{path}: row {first['row']}{named} has {what.format(more=_more(len(empty) - 1))}.")


def _more(rows: int) -> str:
    return f" (and {rows} more row{'s' if rows > 1 else ''})" if rows else ""


def _booleans(path: Path, cells: pd.Series, rows: pd.Series, valid_col: str) -> pd.Series:
    values = cells.str.lower().map(VALID_WORDS)
    bad = values.isna()
    if bad.any():
        first = bad.to_numpy().argmax()
        raise LabelsCsvError(
            f'{path}: row {rows.iloc[first]} has {valid_col} "{cells.iloc[first]}"{_more(int(bad.sum()) - 1)}: write '
            "True or False (also read: true/false, 1/0, yes/no)."
        )
    return values.astype(bool)


def _refuse_conflicts(path: Path, table: pd.DataFrame) -> None:
    # After exact repeats are dropped, a file named twice is named with a different label or is_valid.
    again = table["fname"].duplicated()
    if not again.any():
        return
    second = table[again].iloc[0]
    first = table[table["fname"].eq(second["fname"])].iloc[0]
    others = table.loc[again, "fname"].nunique() - 1
    if first["label"] != second["label"]:
        differ = f"labelled {first['label']} and {second['label']}"
    else:
        differ = f"labelled {first['label']} with is_valid {first['is_valid']} and {second['is_valid']}"
    more = f" ({others} more {'file is' if others == 1 else 'files are'} named twice)" if others else ""
    raise LabelsCsvError(
        f"{path}: rows {first['row']} and {second['row']} both name {second['fname']}, {differ}; keep one{more}."
    )
