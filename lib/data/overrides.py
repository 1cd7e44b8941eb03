"""Review decisions as a versioned overrides file, and applying them to a manifest without touching the images.

A person marks the `action` column of a review table (lib/evaluate/review.py): `keep`, `delete` or
`relabel:<class>`; a blank leaves the image as it is. `record_review` turns those marks into decisions keyed by each
image's sha256 (paths differ between machines; the file name stays beside it for people) and writes them as JSON:

    {"version": 2, "review_run": "<MLflow run id>", "history": [...], "decisions": {"<sha256>": {"file": ...,
     "action": "delete" | "keep" | "relabel", "label": <new class, for relabel>, "was": <label shown>}}}

Recording onto an existing file merges (a later decision for an image replaces the earlier one) and bumps `version`.
`apply_overrides` then drops deleted rows and changes relabelled ones in a copy of the manifest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from lib.common.errors import InputError, MissingInputError
from lib.common.files import write_text_atomically

ACTIONS = ("keep", "delete", "relabel")
RELABEL_PREFIX = "relabel:"
REVIEW_COLUMNS = ("file", "label", "sha256", "action")  # what a reviewed table must have (lib/evaluate/review.py)
OVERRIDES_FILE = "overrides.json"  # the name the data stage records the applied decisions under
CHANGES_FILE = "overrides_changes.csv"  # the rows the decisions removed or relabelled
RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id: a uuid4's 32 hex digits (MLflow 3.17 entities/run_info)
CLASSES_SHOWN = 10  # classes an error lists before "..."
ACTION_FIX = "use keep, delete or relabel:<class>, or leave it blank"


@dataclass(frozen=True)
class Review:
    """The decisions of one reviewed table, and how many of its rows were deleted, relabelled and kept."""

    decisions: dict[str, dict[str, str]]
    deleted: int
    relabelled: int
    kept: int  # rows marked keep or left blank


@dataclass(frozen=True)
class Overrides:
    """Every decision recorded so far, at `version`, with the review run the latest ones came from (when known)."""

    version: int
    decisions: dict[str, dict[str, str]]
    review_run: str | None = None
    history: list[dict] = field(default_factory=list)

    def as_json(self) -> str:
        tree = {"version": self.version, "review_run": self.review_run, "history": self.history}
        tree["decisions"] = dict(sorted(self.decisions.items()))  # sorted: two versions of one file diff cleanly
        return json.dumps(tree, indent=1, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class Applied:
    """A manifest with the decisions applied, the rows they changed, and counts of what changed."""

    manifest: pd.DataFrame
    changes: pd.DataFrame  # path, sha256, action, label, new_label
    counts: dict[str, int]


def read_review(path: Path, *, classes: Iterable[str] = ()) -> Review:
    """Read a reviewed table's `action` column into decisions, refusing an action or class it cannot apply.

    A relabel must name a class of the dataset: one the table's `label` or `predicted` column holds, or one of
    `classes`. Rows of one image (exact copies) must agree.
    """
    path = Path(path)
    table = _read_table(path)
    known = set(table["label"]) | set(table.get("predicted", pd.Series(dtype=str)).dropna()) | set(classes)
    decisions: dict[str, dict[str, str]] = {}
    lines: dict[str, int] = {}
    counts = {"delete": 0, "relabel": 0, "keep": 0}
    for position, row in enumerate(table.itertuples(index=False)):
        line = position + 2  # the header is line 1
        where = f"{path} line {line} ({Path(str(row.file)).name})"
        decision = _decision(row, where, known)
        counts[decision["action"] if decision else "keep"] += 1
        if decision is None:
            continue
        if not isinstance(row.sha256, str) or not row.sha256.strip():
            raise InputError(f"{where} has no sha256: keep the review table's sha256 column as the run wrote it.")
        sha256 = row.sha256.strip()
        if sha256 in decisions and decisions[sha256] != decision:
            raise InputError(
                f"{path} lines {lines[sha256]} and {line} are the same image (sha256 {sha256[:12]}) with different "
                "actions: give both the same one."
            )
        decisions[sha256], lines[sha256] = decision, line
    return Review(decisions, deleted=counts["delete"], relabelled=counts["relabel"], kept=counts["keep"])


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise MissingInputError(f"No such review table: {path}. Give the review.csv a training run wrote.")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as error:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise InputError(f"{path} is not a readable CSV ({error}): give the review.csv a training run wrote.") from None
    missing = [column for column in REVIEW_COLUMNS if column not in table.columns]
    if missing:
        raise InputError(
            f"{path} lacks the review table's column(s) {', '.join(missing)}: mark the action column of the "
            "review.csv a training run wrote (`pets review show RUN_ID` finds it)."
        )
    return table


def _decision(row, where: str, known: set[str]) -> dict[str, str] | None:
    """One row's decision, or None for a blank action (the image stays as it is)."""
    action = str(row.action).strip()
    if not action:
        return None
    base = {"file": Path(str(row.file)).name, "was": str(row.label)}
    if action.lower() in ("keep", "delete"):
        return {**base, "action": action.lower()}
    if action.lower().startswith(RELABEL_PREFIX):
        label = action[len(RELABEL_PREFIX) :].strip()
        if not label or label not in known:
            shown = sorted(known)[:CLASSES_SHOWN] + (["..."] if len(known) > CLASSES_SHOWN else [])
            raise InputError(
                f"{where}: {action!r} names no class of the dataset; relabel to one of {', '.join(shown)}."
            )
        if label == base["was"]:  # relabelled to the label it has: nothing to change
            return {**base, "action": "keep"}
        return {**base, "action": "relabel", "label": label}
    raise InputError(f"{where}: unknown action {action!r}; {ACTION_FIX}.")


def load_overrides(path: Path) -> Overrides:
    """Read an overrides file `record_review` wrote, refusing anything else in one line."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"No such overrides file: {path}. `pets review apply REVIEWED_CSV` writes one.")
    fix = "give the file `pets review apply` wrote, or a reviewed review.csv"
    try:
        tree = json.loads(path.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not an overrides file (not JSON: {error}): {fix}.") from None
    decisions = tree.get("decisions") if isinstance(tree, dict) else None
    version = tree.get("version") if isinstance(tree, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1 or not isinstance(decisions, dict):
        raise InputError(f"{path} is not an overrides file (it needs a version >= 1 and decisions): {fix}.")
    for sha256, decision in decisions.items():
        action = decision.get("action") if isinstance(decision, dict) else None
        if action not in ACTIONS or (action == "relabel" and not isinstance(decision.get("label"), str)):
            raise InputError(f"{path}: the decision for sha256 {sha256[:12]} is none of {', '.join(ACTIONS)}: {fix}.")
    return Overrides(
        version=version, decisions=decisions, review_run=tree.get("review_run"), history=tree.get("history", [])
    )


def merge(existing: Overrides | None, review: Review, *, review_run: str | None, source: str) -> Overrides:
    """Add a review's decisions to the recorded ones (a later decision for an image wins) as the next version.

    A `keep` for an image an earlier decision relabelled to the very label the reviewer saw keeps that relabel: the
    reviewer kept the image as the table showed it.
    """
    decisions = dict(existing.decisions) if existing else {}
    for sha256, decision in review.decisions.items():
        earlier = decisions.get(sha256)
        kept_as_shown = earlier and earlier["action"] == "relabel" and earlier["label"] == decision["was"]
        if decision["action"] == "keep" and kept_as_shown:
            continue
        decisions[sha256] = decision
    version = existing.version + 1 if existing else 1
    entry = {
        "version": version, "review_run": review_run, "source": source,
        "applied_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "deleted": review.deleted, "relabelled": review.relabelled, "kept": review.kept,
    }  # fmt: skip
    history = [*(existing.history if existing else []), entry]
    return Overrides(version=version, decisions=decisions, review_run=review_run, history=history)


def review_run_of(path: Path) -> str | None:
    """The MLflow run a review table came from when its place says so: `<out_dir>/<run id>/review/review.csv`."""
    folder = Path(path).resolve().parent
    return folder.parent.name if folder.name == "review" and RUN_ID.fullmatch(folder.parent.name) else None


def record_review(
    reviewed: Path, to: Path, *, review_run: str | None = None, classes: Iterable[str] = ()
) -> tuple[Overrides, Review]:
    """Read a reviewed table and write its decisions to the overrides file `to`, merged onto the one there if any.

    The review run is `review_run`, else the one the table's place names (`review_run_of`), else unknown.
    Returns the overrides written and the review's counts.
    """
    review = read_review(reviewed, classes=classes)
    to = Path(to)
    existing = load_overrides(to) if to.exists() else None
    run = review_run or review_run_of(reviewed)
    overrides = merge(existing, review, review_run=run, source=Path(reviewed).name)
    write_text_atomically(to, overrides.as_json())
    return overrides, review


def apply_overrides(manifest: pd.DataFrame, overrides: Overrides, *, source: str = "the overrides file") -> Applied:
    """Return a copy of the manifest (rows with `path`, `label`, `sha256`) with deleted rows removed and relabelled
    rows carrying their new label; the input is left as it is. `source` names the decisions in an error.

    A relabel to a class the manifest does not hold is refused; a decision for an image the manifest lacks (the
    data changed since the review) is counted as unmatched.
    """
    labels = set(manifest["label"])
    decisions = overrides.decisions
    strangers = sorted({d["label"] for d in decisions.values() if d["action"] == "relabel"} - labels)
    if strangers:
        raise InputError(
            f"{source} relabels images to {', '.join(strangers[:CLASSES_SHOWN])}, no class of this dataset: fix "
            "those actions in the reviewed table and apply it again, or train on the data it was reviewed on."
        )
    action = manifest["sha256"].map(lambda sha256: decisions.get(sha256, {}).get("action", ""))
    new_label = manifest["sha256"].map(lambda sha256: decisions.get(sha256, {}).get("label"))
    relabel = (action == "relabel") & (new_label != manifest["label"])
    delete = action == "delete"
    changes = manifest.loc[delete | relabel, ["path", "sha256", "label"]].copy()
    changes.insert(2, "action", action[delete | relabel])
    changes["new_label"] = new_label[delete | relabel].where(relabel[delete | relabel], "")
    result = manifest.copy()
    result.loc[relabel, "label"] = new_label[relabel]
    result = result.loc[~delete].reset_index(drop=True)
    counts = {
        "deleted": int(delete.sum()),
        "relabelled": int(relabel.sum()),
        "kept": int((action == "keep").sum()),
        "unmatched": len(set(decisions) - set(manifest["sha256"])),
    }
    return Applied(manifest=result, changes=changes.reset_index(drop=True), counts=counts)


def describe_counts(counts: Mapping[str, int]) -> str:
    """One line of what applying the decisions changed."""
    line = f"{counts['deleted']} images deleted, {counts['relabelled']} relabelled, {counts['kept']} kept as reviewed"
    if counts.get("unmatched"):
        line += f"; {counts['unmatched']} decisions name images this dataset lacks"
    return line
