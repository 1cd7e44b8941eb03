"""Champion promotion: the alias moves, and each move is recorded on the version and in the model's history."""

import json
import socket
from datetime import UTC, datetime

import mlflow
import pytest

from flows.compare import champion_reason
from tasks import tracking
from tasks.tracking import MAX_HISTORY_LENGTH, PromotionError, champion_history, promote
from tests.support.registry import register_versions

MODEL = "promo-pets"


@pytest.fixture
def registry(mlflow_uri, tmp_path):
    """A registered model with versions 1, 2 and 3 and no alias; the store's client."""
    assert register_versions(mlflow_uri, MODEL, 3, tmp_path) == ["1", "2", "3"]
    return mlflow.MlflowClient(mlflow_uri)


def version_tags(client, version: str) -> dict[str, str]:
    tags = client.get_model_version(MODEL, version).tags
    return {key: value for key, value in tags.items() if key.startswith("pets.")}


def test_promote_twice_then_roll_back_keeps_three_entries_and_tags_each_version(registry):
    before = datetime.now(UTC).replace(microsecond=0)
    first = promote(MODEL, "1", reason="first model")
    second = promote(MODEL, 2, reason="better on the new photos")
    rollback = promote(MODEL, "v1", reason="rollback: v2 mislabels sphynx")

    assert (first.previous, second.previous, rollback.previous) == (None, "1", "2")
    assert registry.get_model_version_by_alias(MODEL, "champion").version == 1
    history = champion_history(MODEL)
    assert [(p.version, p.previous, p.reason) for p in history] == [
        ("1", "2", "rollback: v2 mislabels sphynx"),
        ("2", "1", "better on the new photos"),
        ("1", None, "first model"),
    ]
    assert history == [rollback, second, first]
    for promotion in history:
        assert promotion.by.endswith(f"@{socket.gethostname()}")
        assert datetime.fromisoformat(promotion.time).tzinfo == UTC
        assert datetime.fromisoformat(promotion.time) >= before
    # Each version carries its latest promotion: v1 the rollback (from v2), v2 its own (from v1), v3 nothing.
    assert version_tags(registry, "1") == {
        "pets.promoted_at": rollback.time,
        "pets.promoted_from": "2",
        "pets.promotion_reason": "rollback: v2 mislabels sphynx",
        "pets.promoted_by": rollback.by,
        "pets.promoted_as": "champion",
    }
    assert version_tags(registry, "2")["pets.promoted_from"] == "1"
    assert version_tags(registry, "2")["pets.promotion_reason"] == "better on the new photos"
    assert version_tags(registry, "3") == {}
    stored = json.loads(registry.get_registered_model(MODEL).tags["pets.champion_history"])
    assert [entry["version"] for entry in stored] == ["1", "2", "1"]  # appended: oldest first


def test_promoting_the_champion_again_changes_nothing(registry):
    first = promote(MODEL, "2", reason="first")

    again = promote(MODEL, "2", reason="again")

    assert not again.moved and again.previous == "2"
    assert champion_history(MODEL) == [first]
    assert version_tags(registry, "2")["pets.promotion_reason"] == "first"


def test_another_alias_keeps_its_own_history(registry):
    promote(MODEL, "1", reason="champion")
    staged = promote(MODEL, "3", reason="try it", alias="challenger")

    assert champion_history(MODEL, alias="challenger") == [staged]
    assert [p.version for p in champion_history(MODEL)] == ["1"]
    assert registry.get_registered_model(MODEL).aliases == {"champion": 1, "challenger": 3}


def test_an_unknown_version_names_the_model_its_versions_and_aliases(registry):
    promote(MODEL, "2", reason="first")

    with pytest.raises(PromotionError) as raised:
        promote(MODEL, "7", reason="no such version")

    assert str(raised.value) == (
        f"The registered model {MODEL!r} has no version '7'; it has versions 1, 2, 3 (aliases: champion -> v2). "
        "Pass one of them."
    )
    assert registry.get_model_version_by_alias(MODEL, "champion").version == 2


def test_an_unknown_model_names_the_registered_models(registry, mlflow_uri):
    with pytest.raises(PromotionError) as raised:
        promote("no-such-model", "1", reason="nothing")

    message = str(raised.value)
    assert "\n" not in message and "'no-such-model'" in message and f"registered models: {MODEL}" in message
    assert mlflow_uri in message and "name one of them" in message


@pytest.mark.parametrize("reason", ["", "   ", "x" * (tracking.MAX_REASON_LENGTH + 1)])
def test_an_empty_or_overlong_reason_is_refused_before_the_alias_moves(registry, reason):
    with pytest.raises(PromotionError, match="--reason"):
        promote(MODEL, "1", reason=reason)

    assert registry.get_registered_model(MODEL).aliases == {}


def test_the_history_drops_its_oldest_entries_to_fit_the_registry_tag_column(registry):
    reason = "r" * tracking.MAX_REASON_LENGTH  # ~600 characters an entry: about 8 fit in 5000
    promotions = [promote(MODEL, ["1", "2"][index % 2], reason=f"{index:02d}{reason[2:]}") for index in range(12)]

    value = registry.get_registered_model(MODEL).tags["pets.champion_history"]
    kept = champion_history(MODEL)
    assert len(value) <= MAX_HISTORY_LENGTH
    assert kept == promotions[::-1][: len(kept)] and 1 < len(kept) < len(promotions)  # the newest, in order
    one_more = [promotions[-len(kept) - 1].entry(), *json.loads(value)]
    assert len(json.dumps(one_more, separators=(",", ":"))) > MAX_HISTORY_LENGTH  # nothing dropped that would fit


def test_the_compare_flows_move_records_the_comparison_and_why(registry):
    rows = [
        {"arch": "resnet34", "error_rate": 0.0625, "valid_loss": 0.25, "model_version": "3"},
        {"arch": "resnet18", "error_rate": 0.125, "valid_loss": 0.5, "model_version": "2"},
    ]
    promote(MODEL, "2", reason="by hand")

    tracking.set_champion(MODEL, "3", reason=champion_reason("cmp-20250102-030405-a1b2", rows))

    latest = champion_history(MODEL)[0]
    assert (latest.version, latest.previous) == ("3", "2")
    assert latest.reason == (
        "compare cmp-20250102-030405-a1b2: lowest error_rate 0.06250 of 2 architectures (resnet34, valid_loss 0.2500)"
    )
    assert version_tags(registry, "3")["pets.promotion_reason"] == latest.reason


@pytest.mark.parametrize("value", ["not json", '{"version": "1"}', '["1"]'])
def test_a_history_tag_edited_into_something_else_is_named(registry, value):
    registry.set_registered_model_tag(MODEL, "pets.champion_history", value)

    with pytest.raises(PromotionError) as raised:
        champion_history(MODEL)

    assert str(raised.value) == (
        f"The tag pets.champion_history of the registered model {MODEL!r} is not the JSON list of promotions "
        "`pets promote` writes; fix or delete it in the MLflow UI."
    )
