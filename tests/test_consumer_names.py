"""pgflow.log.names.ConsumerName: the one writer and reader of connector consumer names.

Stored positions (cursor rows, broker groups) are keyed by these names, so a name
must read back exactly as written, and anything else must be refused with a reason.
"""

from __future__ import annotations

from typing import Any

import pytest

from pgflow.log.names import ConsumerName, split_shard
from pgflow.workflow._connectors import consumer_name
from pgflow.workflow._dead_letters import dead_letter_consumer


def test_format_is_the_stored_one() -> None:
    assert str(ConsumerName("orders", "payments", 0, 2)) == "orders--payments-1-of-2"
    assert str(ConsumerName("orders", "payments")) == "orders--payments-1-of-1"
    assert ConsumerName("orders", "payments", 1, 2).group == "orders--payments"
    assert consumer_name("orders", "payments", 1, 2) == "orders--payments-2-of-2"
    assert dead_letter_consumer("orders", "payments") == "orders--payments"


@pytest.mark.parametrize(
    ("workflow", "connector", "shard", "count"),
    [
        ("orders", "payments", 0, 1),
        ("orders", "payments", 6, 7),
        ("wf-a", "feed", 1, 2),
        ("app.orders", "in_1", 0, 3),
        ("orders", "x-1-of-2", 0, 2),  # a connector whose name looks like a suffix
        ("orders", "pay--ments", 0, 2),  # "--" in the connector: first "--" splits
        ("ördërs ✓", "päy/ments 💳", 2, 10),
        ("o\nrders", "pay\tments", 0, 1),
        ("o" * 300, "c" * 300, 99, 100),
    ],
)
def test_round_trip(workflow: str, connector: str, shard: int, count: int) -> None:
    name = ConsumerName(workflow, connector, shard, count)
    text = str(name)
    assert ConsumerName.parse(text) == name
    assert ConsumerName.parse(text, workflow=workflow) == name
    assert str(ConsumerName.parse(text)) == text
    assert split_shard(text) == (name.group, shard, count)


def test_workflow_with_double_dash_needs_the_workflow() -> None:
    name = ConsumerName("a--b", "c", 0, 1)
    assert ConsumerName.parse(str(name), workflow="a--b") == name
    # without it the first "--" splits: a different (valid) reading
    assert ConsumerName.parse(str(name)) == ConsumerName("a", "b--c", 0, 1)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "orders",
        "orders--payments",  # no shard suffix (a dead letter consumer)
        "orders--payments-0-of-2",  # shards count from 1
        "orders--payments-3-of-2",
        "orders--payments-1-of-0",
        "orders--payments-01-of-2",  # would not read back as written
        "orders--payments-+1-of-2",
        "orders--payments-\u0661-of-\u0662",  # non-ASCII digits
        "orders--payments-1-of-2 ",
        "orders--payments-1-of-2\n",
        "orderspayments-1-of-2",  # no "--"
        "--payments-1-of-2",  # empty workflow
        "orders---1-of-2",  # empty connector
        "-1-of-2",
        "orders--pay\x00ments-1-of-2",
    ],
)
def test_hostile_names_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="consumer name"):
        ConsumerName.parse(text)


def test_wrong_workflow_is_refused() -> None:
    with pytest.raises(ValueError, match="not one of workflow 'billing'"):
        ConsumerName.parse("orders--payments-1-of-2", workflow="billing")


@pytest.mark.parametrize(
    "args",
    [
        ("", "c", 0, 1),
        ("w", "", 0, 1),
        ("w", "c", -1, 1),
        ("w", "c", 1, 1),
        ("w", "c", 0, 0),
        ("w", "c", True, 2),
        ("w", "c", 0, 2.0),
        (None, "c", 0, 1),
        ("w\x00", "c", 0, 1),
    ],
)
def test_bad_parts_are_refused(args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError, match="consumer name"):
        ConsumerName(*args)


def test_not_a_string() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        ConsumerName.parse(b"orders--payments-1-of-2")  # type: ignore[arg-type]


def test_split_shard_on_prefixed_keys() -> None:
    key = "connector:app.payments:orders--payments-2-of-3"
    assert split_shard(key) == ("connector:app.payments:orders--payments", 1, 3)
    assert split_shard("connector:app.payments:orders--payments") is None
    assert split_shard("orders/START") is None
