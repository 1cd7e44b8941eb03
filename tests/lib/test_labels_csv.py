from pathlib import Path

import pytest

from lib.common.errors import InputError
from lib.data.labels_csv import LabelsCsvError, read_labels_csv


def write(tmp_path, text, name="labels.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_text(text, encoding=encoding, newline="")
    return path


def refusal(path, **columns) -> str:
    """The message read_labels_csv refuses the file with, checked to be one line of a user error."""
    with pytest.raises(LabelsCsvError) as caught:
        read_labels_csv(path, **columns)
    assert isinstance(caught.value, InputError)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_reads_names_labels_line_numbers_and_the_valid_column(tmp_path):
    path = write(tmp_path, "fname,label,is_valid\n a/1.jpg , cat ,True\n\nb/2.jpg,007,false\nc/3.jpg,1,1\n")

    rows = read_labels_csv(path)

    assert rows.table.to_dict("records") == [
        {"fname": "a/1.jpg", "label": "cat", "row": 2, "is_valid": True},
        {"fname": "b/2.jpg", "label": "007", "row": 4, "is_valid": False},  # line 3 is blank
        {"fname": "c/3.jpg", "label": "1", "row": 5, "is_valid": True},
    ]
    assert rows.table["is_valid"].dtype == bool
    assert rows.table["row"].dtype == "int64"
    assert rows.duplicates == 0


def test_without_the_valid_column_the_table_has_no_is_valid(tmp_path):
    rows = read_labels_csv(write(tmp_path, "fname,label,notes\na.jpg,cat,first\n"))

    assert list(rows.table.columns) == ["fname", "label", "row"]
    assert rows.table.to_dict("records") == [{"fname": "a.jpg", "label": "cat", "row": 2}]


def test_labels_that_look_like_numbers_or_missing_values_stay_text(tmp_path):
    rows = read_labels_csv(write(tmp_path, "fname,label\na.jpg,007\nb.jpg,NA\nc.jpg,null\nd.jpg,1.50\n"))

    assert list(rows.table["label"]) == ["007", "NA", "null", "1.50"]


def test_other_column_names_and_column_order(tmp_path):
    path = write(tmp_path, "split,breed,extra,image\n0,pug,x,p.jpg\nyes,beagle,y,b.jpg\n")

    rows = read_labels_csv(path, fname_col="image", label_col="breed", valid_col="split")

    assert rows.table.to_dict("records") == [
        {"fname": "p.jpg", "label": "pug", "row": 2, "is_valid": False},
        {"fname": "b.jpg", "label": "beagle", "row": 3, "is_valid": True},
    ]


def test_excel_byte_order_mark_crlf_and_quoted_header(tmp_path):
    path = write(tmp_path, '"fname","label"\r\n"a.jpg","cat"\r\nb.jpg,dog\r\n', encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")

    rows = read_labels_csv(path)

    assert rows.table.to_dict("records") == [
        {"fname": "a.jpg", "label": "cat", "row": 2},
        {"fname": "b.jpg", "label": "dog", "row": 3},
    ]


def test_non_ascii_names_spaces_and_commas_in_quoted_names(tmp_path):
    text = 'fname,label\nBilder/Schäferhund 1.jpg,Schäferhund\n日本 猫.png, 三毛猫 \n"with, comma.jpg",pug\n'
    rows = read_labels_csv(write(tmp_path, text, name="Étiquettes ü.csv"))

    assert list(rows.table["fname"]) == ["Bilder/Schäferhund 1.jpg", "日本 猫.png", "with, comma.jpg"]
    assert list(rows.table["label"]) == ["Schäferhund", "三毛猫", "pug"]


def test_line_numbers_count_line_breaks_inside_quoted_cells(tmp_path):
    text = 'fname,label,notes\na.jpg,cat,"two\nlines"\nb.jpg,dog,\n'
    assert list(read_labels_csv(write(tmp_path, text)).table["row"]) == [2, 4]

    path = write(tmp_path, text + "\nc.jpg,,x\n")  # line 5 blank
    assert refusal(path) == f"{path}: row 6 (c.jpg) has an empty label: write it in column label or delete the row."


@pytest.mark.parametrize(
    ("cell", "expected"),
    [("True", True), ("False", False), ("true", True), ("FALSE", False), ("1", True), ("0", False)]
    + [("yes", True), ("No", False), (" YES ", True)],
)
def test_valid_spellings(tmp_path, cell, expected):
    rows = read_labels_csv(write(tmp_path, f"fname,label,is_valid\na.jpg,cat,{cell}\n"))

    assert rows.table["is_valid"].tolist() == [expected]


@pytest.mark.parametrize("cell", ["maybe", "", "2", "1.0", "valid"])
def test_other_valid_values_are_refused_naming_row_and_value(tmp_path, cell):
    path = write(tmp_path, f"fname,label,is_valid\na.jpg,cat,true\nb.jpg,dog,{cell}\nc.jpg,dog,x\n")

    assert refusal(path) == (
        f'{path}: row 3 has is_valid "{cell}" (and 1 more row): write True or False '
        "(also read: true/false, 1/0, yes/no)."
    )


def test_exact_repeats_are_dropped_and_counted(tmp_path):
    text = "fname,label,is_valid\na.jpg,cat,0\nb.jpg,dog,1\n a.jpg ,cat,False\nb.jpg,dog,yes\nb.jpg,dog,1\n"

    rows = read_labels_csv(write(tmp_path, text))

    assert rows.duplicates == 3
    assert rows.table.to_dict("records") == [
        {"fname": "a.jpg", "label": "cat", "row": 2, "is_valid": False},
        {"fname": "b.jpg", "label": "dog", "row": 3, "is_valid": True},
    ]


def test_a_file_labelled_twice_names_both_rows_and_labels(tmp_path):
    lines = ["fname,label", "x.jpg,cat", "images/a.jpg,cat", "y.jpg,dog", "", "x.jpg,cat", "z.jpg,cat", "w.jpg,cat"]
    path = write(tmp_path, "\n".join([*lines, "images/a.jpg,dog", "y.jpg,cat", "z.jpg,pug"]) + "\n")

    assert refusal(path) == (
        f"{path}: rows 3 and 9 both name images/a.jpg, labelled cat and dog; keep one (2 more files are named twice)."
    )


def test_a_file_both_valid_and_not_names_both_rows(tmp_path):
    path = write(tmp_path, "fname,label,is_valid\na.jpg,cat,True\nb.jpg,dog,no\na.jpg,cat,0\n")

    assert (
        refusal(path) == f"{path}: rows 2 and 4 both name a.jpg, labelled cat with is_valid True and False; keep one."
    )


@pytest.mark.parametrize("label", ["", "   ", None], ids=["blank", "whitespace", "short row"])
def test_an_empty_label_names_the_row_and_the_file(tmp_path, label):
    row = "b c.jpg" if label is None else f"b c.jpg,{label}"
    path = write(tmp_path, f"fname,label\na.jpg,cat\n{row}\n")

    assert refusal(path) == f"{path}: row 3 (b c.jpg) has an empty label: write it in column label or delete the row."


def test_an_empty_file_name_names_the_row_and_its_label(tmp_path):
    path = write(tmp_path, "image,breed\na.jpg,cat\n  ,dog\n,pug\n")

    assert refusal(path, fname_col="image", label_col="breed") == (
        f"{path}: row 3 (label dog) has an empty file name (and 1 more row): write it in column image or delete the "
        "row."
    )


def test_rows_of_separators_only_are_skipped_like_blank_lines(tmp_path):
    rows = read_labels_csv(write(tmp_path, "fname,label,is_valid\na.jpg,cat,1\n,,\n , ,\n\n"))

    assert rows.table.to_dict("records") == [{"fname": "a.jpg", "label": "cat", "row": 2, "is_valid": True}]


def test_missing_columns_list_the_file_s_columns_and_the_option(tmp_path):
    one = write(tmp_path, "fname,breed\na.jpg,cat\n", name="one.csv")
    both = write(tmp_path, "file,breed,is_valid\na.jpg,cat,1\n", name="both.csv")

    assert refusal(one) == (
        f"Labels CSV {one} has no column 'label' (its columns: 'fname', 'breed'): name the label column with "
        "--label-col."
    )
    assert refusal(both) == (
        f"Labels CSV {both} has no columns 'fname' and 'label' (its columns: 'file', 'breed', 'is_valid'): name the "
        "file name and label columns with --fname-col and --label-col."
    )
    assert "--fname-col" in refusal(both, label_col="breed")


@pytest.mark.parametrize(("separator", "word"), [(";", "semicolon"), ("\t", "tab")])
def test_a_header_of_one_column_with_another_separator_says_so(tmp_path, separator, word):
    path = write(tmp_path, f"fname{separator}label\na.jpg{separator}cat\n")

    message = refusal(path)

    assert message.startswith(f"Labels CSV {path} has no columns 'fname' and 'label'")
    assert message.endswith(f"it looks {word}-separated, save it comma-separated.")


def test_a_column_named_twice_in_the_header_is_refused(tmp_path):
    path = write(tmp_path, "fname,label,label\na.jpg,cat,dog\n")

    assert refusal(path) == f"{path}: the header names column 'label' 2 times (columns 2, 3): rename all but one."


def test_the_same_column_for_names_and_labels_is_refused(tmp_path):
    path = write(tmp_path, "fname,label\na.jpg,cat\n")

    assert "--fname-col and --label-col both name column 'fname'" in refusal(path, label_col="fname")


def test_a_row_with_more_fields_than_the_header_names_its_line(tmp_path):
    path = write(tmp_path, 'fname,label,notes\na.jpg,cat,"x\ny"\n\nb,c.jpg,dog,\n')

    assert refusal(path) == (
        f'{path}: row 5 has 4 fields but the header has 3: quote a value that holds a comma ("a,b.jpg"), or remove '
        "the extra commas."
    )


def test_an_unclosed_quote_names_its_line(tmp_path):
    path = write(tmp_path, 'fname,label\na.jpg,cat\n\n"b.jpg,dog\nc.jpg,cat\n')

    assert refusal(path) == f'{path}: row 4 opens a quote (") that never closes: close it, or remove the stray quote.'


def test_a_missing_file_or_a_folder(tmp_path):
    missing = tmp_path / "nope.csv"

    assert refusal(missing) == f"Labels CSV {missing} does not exist: pass the path of an existing CSV file."
    assert refusal(tmp_path) == f"Labels CSV {tmp_path} is a folder: pass the path of the CSV file in it."


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc")
def test_a_file_that_cannot_be_read_says_why():
    # Reading /proc/self/mem from offset 0 fails with EIO (the page is unmapped), even for root, who can read a file
    # with no read permission.
    assert refusal(Path("/proc/self/mem")) == (
        "Labels CSV /proc/self/mem cannot be read (Input/output error): make it readable or pass another file."
    )


def test_text_that_is_not_utf8_says_where_and_how_to_save_it(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("fname,label\na.jpg,cat\nb.jpg,Schäferhund\n".encode("latin-1"))
    utf16 = write(tmp_path, "fname,label\na.jpg,cat\n", name="utf16.csv", encoding="utf-16")

    assert refusal(latin) == (
        f"Labels CSV {latin} is not UTF-8 text (byte 0xe4 on line 3): save it as UTF-8 (Excel: CSV UTF-8)."
    )
    assert refusal(utf16) == f"Labels CSV {utf16} is UTF-16 text, not UTF-8: save it as UTF-8 (Excel: CSV UTF-8)."


@pytest.mark.parametrize("text", ["", " \n\n", "\ufeff"], ids=["zero bytes", "blank lines", "byte-order mark only"])
def test_an_empty_file_has_no_rows(tmp_path, text):
    path = write(tmp_path, text, encoding="utf-8")

    assert refusal(path) == f"Labels CSV {path} has no rows (it is empty): write a header line, then a row per image."


@pytest.mark.parametrize("text", ["fname,label", "fname,label\n", "fname,label\n\n,\n"])
def test_a_header_alone_has_no_rows(tmp_path, text):
    path = write(tmp_path, text)

    assert refusal(path) == (f"Labels CSV {path} has no rows below its header: add a row per image (fname,label).")


def test_a_blank_line_above_the_header_is_refused(tmp_path):
    path = write(tmp_path, "\nfname,label\na.jpg,cat\n")

    assert refusal(path) == f"Labels CSV {path} starts with a blank line: delete the lines above its header."


def test_a_hundred_thousand_rows_are_read_whole(tmp_path):
    body = "".join(
        f"breed_{i % 37}/img {i}.jpg,breed_{i % 37},{'True' if i % 5 == 0 else 'False'}\n" for i in range(100_000)
    )
    path = write(tmp_path, "fname,label,is_valid\n" + body)

    rows = read_labels_csv(path)

    assert len(rows.table) == 100_000
    assert rows.table["is_valid"].sum() == 20_000
    assert rows.table["row"].iloc[-1] == 100_001
