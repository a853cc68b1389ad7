from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from typing import Any, Callable

import pytest

from safe_fast import sharedata
from safe_fast.sharedata import (
    GENESIS_HASH,
    RuleError,
    ShareData,
    ShareDataEvent,
    ShareDataManager,
    ShareFunction,
    TransactionOutcome,
    TransactionRecord,
)


def increment_rule(current: Any, proposed: Any) -> bool:
    return proposed["count"] == current["count"] + 1


INCREMENT = ShareFunction("increment", increment_rule)
ACCEPT_ALL = ShareFunction("accept", lambda current, proposed: True)


def make_manager(
    share_data_id: str = "doc", current_state: Any = None
) -> tuple[ShareDataManager, ShareData]:
    manager = ShareDataManager()
    share_data = ShareData(
        share_data_id,
        current_state={"count": 0} if current_state is None else current_state,
        functions=[INCREMENT, ACCEPT_ALL],
    )
    manager.add_share_data(share_data)
    return manager, share_data


def record_events(manager: ShareDataManager) -> list[ShareDataEvent]:
    events: list[ShareDataEvent] = []
    for name in (
        "share-data:added",
        "share-data:updated",
        "share-data:removed",
        "share-data:transaction",
    ):
        manager.on(name, events.append)
    return events


async def three_transactions() -> ShareData:
    """Accepted, rejected, accepted, with a proof on the second one."""
    manager, share_data = make_manager()
    await manager.apply_transaction("doc", {"count": 1}, INCREMENT)
    await manager.apply_transaction("doc", {"count": 5}, INCREMENT, proof={"sig": "abc"})
    await manager.apply_transaction("doc", {"count": 2}, INCREMENT)
    return share_data


# Construction and validation.


def test_share_function_fields() -> None:
    function = ShareFunction("f", increment_rule, name="Increment")
    assert (function.id, function.rule, function.name) == ("f", increment_rule, "Increment")
    assert ShareFunction(None, increment_rule).id is None


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("", increment_rule), {}, "ShareFunction.id must be a non-empty string or None"),
        ((3, increment_rule), {}, "ShareFunction.id must be a non-empty string or None"),
        (("f", "not callable"), {}, "ShareFunction.rule must be callable"),
        (("f", increment_rule), {"name": 3}, "ShareFunction.name must be a string or None"),
    ],
)
def test_share_function_validation(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        ShareFunction(*args, **kwargs)


def test_share_function_name_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        ShareFunction("f", increment_rule, "name")  # type: ignore[misc]


def test_share_data_fields() -> None:
    share_data = ShareData("doc", "pk", current_state={"a": 1}, functions=(INCREMENT,))
    assert share_data.id == "doc"
    assert share_data.public_key == "pk"
    assert share_data.current_state == {"a": 1}
    assert share_data.functions == [INCREMENT]
    assert isinstance(share_data.functions, list)
    assert share_data.transaction_history == []
    assert share_data.last_transaction_id is None
    assert share_data.verify_chain()
    assert repr(share_data) == "<ShareData id='doc' transactions=0>"


def test_share_data_defaults() -> None:
    share_data = ShareData("doc")
    assert share_data.public_key is None
    assert share_data.current_state is None
    assert share_data.functions == []


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (("",), {}, TypeError, "ShareData.id must be a non-empty string"),
        ((None,), {}, TypeError, "ShareData.id must be a non-empty string"),
        (("doc", 5), {}, TypeError, "ShareData.public_key must be a string or None"),
        (("doc",), {"functions": 5}, TypeError, "ShareData.functions must be an iterable"),
        (("doc",), {"functions": "ab"}, TypeError, "ShareData.functions must be an iterable"),
        (
            ("doc",),
            {"functions": [INCREMENT, increment_rule]},
            TypeError,
            r"ShareData.functions\[1\] must be a ShareFunction, got function",
        ),
        (
            ("doc",),
            {"functions": [INCREMENT, ShareFunction("increment", increment_rule)]},
            ValueError,
            "ShareData.functions has duplicate id 'increment'",
        ),
    ],
)
def test_share_data_validation(
    args: tuple, kwargs: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ShareData(*args, **kwargs)


def test_functions_without_id_may_repeat() -> None:
    functions = [ShareFunction(None, increment_rule), ShareFunction(None, increment_rule)]
    assert len(ShareData("doc", functions=functions).functions) == 2


def test_records_and_events_are_frozen() -> None:
    record = TransactionRecord("1", "f", None, True, 0.0, None, GENESIS_HASH, "0" * 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.accepted = False  # type: ignore[misc]
    event = ShareDataEvent("share-data:added", "doc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.type = "x"  # type: ignore[misc]
    assert not hasattr(event, "__dict__")
    assert (event.transaction_id, event.accepted, event.current_state, event.share_data) == (
        None,
        None,
        None,
        None,
    )


# Transactions.


async def test_transaction_ids_are_consecutive() -> None:
    manager, share_data = make_manager()
    outcomes = [
        await manager.apply_transaction("doc", {"count": count}, INCREMENT)
        for count in (1, 2, 9, 3)
    ]
    assert [outcome.transaction_id for outcome in outcomes] == ["1", "2", "3", "4"]
    assert [outcome.accepted for outcome in outcomes] == [True, True, False, True]
    assert outcomes[0] == TransactionOutcome(True, "1")
    assert share_data.last_transaction_id == "4"


async def test_history_records_accepted_and_rejected() -> None:
    before = time.time()
    share_data = await three_transactions()
    after = time.time()

    history = share_data.transaction_history
    assert [record.transaction_id for record in history] == ["1", "2", "3"]
    assert [record.accepted for record in history] == [True, False, True]
    assert [record.proposed_data for record in history] == [
        {"count": 1},
        {"count": 5},
        {"count": 2},
    ]
    assert [record.proof for record in history] == [None, {"sig": "abc"}, None]
    assert all(record.function_id == "increment" for record in history)
    assert all(before <= record.timestamp <= after for record in history)
    assert history[0].prev_hash == GENESIS_HASH == "0" * 64
    for previous, record in zip(history, history[1:]):
        assert record.prev_hash == previous.hash
    for record in history:
        assert len(record.hash) == 64
        int(record.hash, 16)
    assert len({record.hash for record in history}) == 3
    assert share_data.verify_chain()


async def test_state_changes_only_on_accept() -> None:
    manager, share_data = make_manager()
    proposal = {"count": 1}
    assert (await manager.apply_transaction("doc", proposal, INCREMENT)).accepted
    assert share_data.current_state is proposal
    assert not (await manager.apply_transaction("doc", {"count": 7}, INCREMENT)).accepted
    assert share_data.current_state is proposal


async def test_rule_sees_current_state_and_proposal() -> None:
    seen: list[tuple[Any, Any]] = []
    function = ShareFunction("spy", lambda current, proposed: seen.append((current, proposed)))
    manager, _ = make_manager(current_state="old")
    outcome = await manager.apply_transaction("doc", "new", function)
    assert seen == [("old", "new")]
    # None is falsy: rejected.
    assert not outcome.accepted


@pytest.mark.parametrize(
    ("result", "accepted"), [(1, True), ("yes", True), (0, False), ("", False), (None, False)]
)
async def test_rule_result_is_coerced_to_bool(result: Any, accepted: bool) -> None:
    manager, share_data = make_manager()
    function = ShareFunction("f", lambda current, proposed: result)
    outcome = await manager.apply_transaction("doc", {"count": 1}, function)
    assert outcome.accepted is accepted
    assert share_data.transaction_history[0].accepted is accepted


async def test_async_rule() -> None:
    async def rule(current: Any, proposed: Any) -> bool:
        await asyncio.sleep(0)
        return proposed > current

    manager, share_data = make_manager(current_state=1)
    function = ShareFunction("grow", rule)
    assert (await manager.apply_transaction("doc", 2, function)).accepted
    assert not (await manager.apply_transaction("doc", 0, function)).accepted
    assert share_data.current_state == 2
    assert share_data.last_transaction_id == "2"


async def test_function_without_id_is_recorded_with_none() -> None:
    manager, share_data = make_manager()
    await manager.apply_transaction("doc", 1, ShareFunction(None, lambda c, p: True))
    assert share_data.transaction_history[0].function_id is None
    assert share_data.verify_chain()


async def test_apply_transaction_unknown_id() -> None:
    manager, _ = make_manager()
    with pytest.raises(KeyError, match="shareDataId nope not found"):
        await manager.apply_transaction("nope", 1, ACCEPT_ALL)


async def test_apply_transaction_requires_a_share_function() -> None:
    manager, _ = make_manager()
    with pytest.raises(TypeError, match="function must be a ShareFunction, got function"):
        await manager.apply_transaction("doc", 1, increment_rule)  # type: ignore[arg-type]


def raise_boom(current: Any, proposed: Any) -> bool:
    raise ValueError("boom")


async def async_raise_boom(current: Any, proposed: Any) -> bool:
    await asyncio.sleep(0)
    raise ValueError("boom")


@pytest.mark.parametrize("rule", [raise_boom, async_raise_boom])
async def test_raising_rule_records_nothing(rule: Any) -> None:
    manager, share_data = make_manager()
    events = record_events(manager)
    with pytest.raises(RuleError) as excinfo:
        await manager.apply_transaction("doc", {"count": 1}, ShareFunction("increment", rule))
    assert str(excinfo.value) == "rule of function 'increment' raised: ValueError: boom"
    assert isinstance(excinfo.value.__cause__, ValueError)
    assert share_data.transaction_history == []
    assert share_data.current_state == {"count": 0}
    assert events == []
    # The manager is still usable, and numbering is unaffected.
    outcome = await manager.apply_transaction("doc", {"count": 1}, INCREMENT)
    assert outcome == TransactionOutcome(True, "1")


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (ShareFunction("f", raise_boom, name="Boom"), "rule of function 'Boom' raised"),
        (ShareFunction(None, raise_boom), "rule of function 'raise_boom' raised"),
    ],
)
async def test_rule_error_names_the_function(function: ShareFunction, message: str) -> None:
    manager, _ = make_manager()
    with pytest.raises(RuleError, match=message):
        await manager.apply_transaction("doc", 1, function)


async def test_rule_error_without_message() -> None:
    def rule(current: Any, proposed: Any) -> bool:
        raise KeyError

    manager, _ = make_manager()
    with pytest.raises(RuleError) as excinfo:
        await manager.apply_transaction("doc", 1, ShareFunction("f", rule))
    assert str(excinfo.value) == "rule of function 'f' raised: KeyError"


async def test_unusable_truth_value_is_a_rule_error() -> None:
    class Ambiguous:
        def __bool__(self) -> bool:
            raise ValueError("ambiguous")

    manager, share_data = make_manager()
    with pytest.raises(RuleError, match="ValueError: ambiguous"):
        await manager.apply_transaction("doc", 1, ShareFunction("f", lambda c, p: Ambiguous()))
    assert share_data.transaction_history == []


# Concurrency.


async def test_concurrent_proposals_get_consecutive_ids_in_event_order() -> None:
    seen: dict[int, Any] = {}

    async def rule(current: Any, proposed: Any) -> bool:
        seen[proposed] = current
        await asyncio.sleep(random.random() / 1000)
        return proposed % 3 != 0

    manager, share_data = make_manager(current_state=0)
    events = record_events(manager)
    function = ShareFunction("f", rule)
    outcomes = await asyncio.gather(
        *(manager.apply_transaction("doc", value, function) for value in range(1, 31))
    )

    ids = [outcome.transaction_id for outcome in outcomes]
    assert sorted(ids, key=int) == [str(n) for n in range(1, 31)]
    assert [event.transaction_id for event in events] == [str(n) for n in range(1, 31)]
    history = share_data.transaction_history
    # Each rule saw exactly the state its proposal would replace.
    state: Any = 0
    for record, event in zip(history, events):
        assert seen[record.proposed_data] == state
        if record.accepted:
            state = record.proposed_data
        assert event.current_state == state
        assert event.accepted == record.accepted
    assert share_data.current_state == state
    assert share_data.verify_chain()
    # Per-id locks do not outlive their users.
    assert manager._locks == {}


async def test_transactions_on_different_ids_do_not_wait_for_each_other() -> None:
    release = asyncio.Event()

    async def blocking(current: Any, proposed: Any) -> bool:
        await release.wait()
        return True

    manager, _ = make_manager("a")
    manager.add_share_data(ShareData("b"))
    blocked = asyncio.create_task(manager.apply_transaction("a", 1, ShareFunction("f", blocking)))
    await asyncio.sleep(0)
    outcome = await asyncio.wait_for(manager.apply_transaction("b", 1, ACCEPT_ALL), 1)
    assert outcome == TransactionOutcome(True, "1")
    release.set()
    assert (await blocked).accepted


async def test_removed_while_rule_runs() -> None:
    async def rule(current: Any, proposed: Any) -> bool:
        manager.remove_share_data_by_id("doc")
        await asyncio.sleep(0)
        return True

    manager, share_data = make_manager()
    events = record_events(manager)
    with pytest.raises(KeyError, match="shareDataId doc not found"):
        await manager.apply_transaction("doc", {"count": 1}, ShareFunction("f", rule))
    assert share_data.transaction_history == []
    assert [event.type for event in events] == ["share-data:removed"]
    assert manager._locks == {}


async def test_replaced_while_rule_runs_is_judged_again() -> None:
    seen: list[Any] = []
    replacement = ShareData("doc", current_state="replacement")

    async def rule(current: Any, proposed: Any) -> bool:
        seen.append(current)
        if manager.get_share_data_by_id("doc") is original:
            manager.update_share_data(replacement)
        await asyncio.sleep(0)
        return True

    manager, original = make_manager(current_state="original")
    outcome = await manager.apply_transaction("doc", "new", ShareFunction("f", rule))
    assert seen == ["original", "replacement"]
    assert outcome == TransactionOutcome(True, "1")
    assert original.transaction_history == []
    assert original.current_state == "original"
    assert replacement.current_state == "new"
    assert replacement.last_transaction_id == "1"


async def test_state_set_directly_while_rule_runs_is_judged_again() -> None:
    seen: list[Any] = []

    async def rule(current: Any, proposed: Any) -> bool:
        seen.append(current)
        if current == "a":
            share_data.current_state = "b"
        await asyncio.sleep(0)
        return current == "b"

    manager, share_data = make_manager(current_state="a")
    outcome = await manager.apply_transaction("doc", "c", ShareFunction("f", rule))
    assert seen == ["a", "b"]
    assert outcome.accepted
    assert share_data.current_state == "c"


# Hash chain.


TAMPERED_VALUES: dict[str, Any] = {
    "transaction_id": "99",
    "function_id": "forged",
    "proposed_data": {"count": 1000},
    "accepted": None,  # replaced by the negation of the original
    "timestamp": 0.0,
    "proof": {"sig": "forged"},
    "prev_hash": "f" * 64,
    "hash": "f" * 64,
}


def test_tampered_values_cover_every_field() -> None:
    assert set(TAMPERED_VALUES) == {f.name for f in dataclasses.fields(TransactionRecord)}


@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("field_name", sorted(TAMPERED_VALUES))
async def test_chain_detects_edit_of_any_field(field_name: str, position: int) -> None:
    share_data = await three_transactions()
    record = share_data.transaction_history[position]
    value = TAMPERED_VALUES[field_name]
    if field_name == "accepted":
        value = not record.accepted
    assert getattr(record, field_name) != value
    object.__setattr__(record, field_name, value)
    assert not share_data.verify_chain()


@pytest.mark.parametrize("position", [0, 1, 2])
async def test_chain_detects_edit_with_type_change(position: int) -> None:
    share_data = await three_transactions()
    record = share_data.transaction_history[position]
    # Equal in Python, different on the record.
    object.__setattr__(record, "accepted", int(record.accepted))
    assert not share_data.verify_chain()


@pytest.mark.parametrize("position", [0, 1, 2])
async def test_chain_detects_replaced_record(position: int) -> None:
    share_data = await three_transactions()
    history = share_data.transaction_history
    history[position] = dataclasses.replace(history[position], proposed_data={"count": 42})
    assert not share_data.verify_chain()


@pytest.mark.parametrize("position", [0, 1, 2])
async def test_chain_detects_in_place_mutation_of_data(position: int) -> None:
    share_data = await three_transactions()
    share_data.transaction_history[position].proposed_data["count"] = 42
    assert not share_data.verify_chain()


@pytest.mark.parametrize(("first", "second"), [(0, 1), (1, 2), (0, 2)])
async def test_chain_detects_reorder(first: int, second: int) -> None:
    share_data = await three_transactions()
    history = share_data.transaction_history
    history[first], history[second] = history[second], history[first]
    assert not share_data.verify_chain()


async def test_chain_detects_reversal() -> None:
    share_data = await three_transactions()
    share_data.transaction_history.reverse()
    assert not share_data.verify_chain()


@pytest.mark.parametrize("position", [0, 1, 2])
async def test_chain_detects_removal(position: int) -> None:
    share_data = await three_transactions()
    del share_data.transaction_history[position]
    assert not share_data.verify_chain()


async def test_chain_detects_truncation() -> None:
    share_data = await three_transactions()
    share_data.transaction_history.clear()
    assert not share_data.verify_chain()


async def test_chain_detects_duplicate_record() -> None:
    share_data = await three_transactions()
    share_data.transaction_history.append(share_data.transaction_history[-1])
    assert not share_data.verify_chain()


async def test_chain_detects_forged_record_appended_with_valid_links() -> None:
    share_data = await three_transactions()
    last = share_data.transaction_history[-1]
    fields = ("4", "increment", {"count": 3}, True, time.time(), None, last.hash)
    forged = TransactionRecord(*fields, sharedata._hash_fields(*fields))
    share_data.transaction_history.append(forged)
    assert not share_data.verify_chain()


async def test_chain_detects_foreign_objects() -> None:
    share_data = await three_transactions()
    share_data.transaction_history[1] = dataclasses.asdict(  # type: ignore[call-overload]
        share_data.transaction_history[1]
    )
    assert not share_data.verify_chain()


async def test_chain_is_deterministic() -> None:
    share_data = await three_transactions()
    assert share_data.verify_chain()
    assert share_data.verify_chain()


class Opaque:
    def __repr__(self) -> str:
        return "Opaque()"


def make_cycle() -> list[Any]:
    cycle: list[Any] = [1]
    cycle.append(cycle)
    return cycle


@pytest.mark.parametrize(
    "data",
    [
        2**100,
        -(2**80),
        (1, 2, (3, 4)),
        {"nested": {"b": [1, 2], "a": None}},
        {"set": {"x", "y", "z"}, "frozen": frozenset({3, 1, 2})},
        {1: "int key", "1": "str key"},
        {(1, 2): "tuple key"},
        math.nan,
        [math.inf, -math.inf],
        {"nan": math.nan, 2: {"inner": math.nan}},
        Opaque(),
        b"bytes",
        "caf\u00e9 \u2603 \U0001f600",
        "lone \ud800 surrogate",
        make_cycle(),
    ],
    ids=repr,
)
async def test_any_application_data_can_be_hashed(data: Any) -> None:
    manager, share_data = make_manager()
    await manager.apply_transaction("doc", data, ACCEPT_ALL, proof=data)
    await manager.apply_transaction("doc", {"after": True}, ACCEPT_ALL)
    assert share_data.current_state == {"after": True}
    assert share_data.verify_chain()


async def test_fallback_encoding_still_detects_edits() -> None:
    manager, share_data = make_manager()
    await manager.apply_transaction("doc", {"value": math.nan, 1: "a"}, ACCEPT_ALL)
    assert share_data.verify_chain()
    share_data.transaction_history[0].proposed_data[1] = "b"
    assert not share_data.verify_chain()


async def test_canonical_encoding_ignores_key_order() -> None:
    manager, share_data = make_manager()
    await manager.apply_transaction("doc", {"a": 1, "b": 2}, ACCEPT_ALL)
    record = share_data.transaction_history[0]
    object.__setattr__(record, "proposed_data", {"b": 2, "a": 1})
    assert share_data.verify_chain()


async def test_too_deeply_nested_data_records_nothing() -> None:
    data: Any = []
    for _ in range(100_000):
        data = [data]
    manager, share_data = make_manager()
    events = record_events(manager)
    with pytest.raises(ValueError, match="nested too deeply"):
        await manager.apply_transaction("doc", data, ACCEPT_ALL)
    assert share_data.transaction_history == []
    assert share_data.current_state == {"count": 0}
    assert events == []
    assert share_data.verify_chain()


# Manager: add, update, remove and their events.


def test_add_and_get() -> None:
    manager = ShareDataManager()
    events = record_events(manager)
    share_data = ShareData("doc", current_state={"a": 1})
    manager.add_share_data(share_data)
    assert manager.get_share_data_by_id("doc") is share_data
    assert manager.get_share_data_by_id("other") is None
    assert events == [
        ShareDataEvent(
            "share-data:added", "doc", current_state={"a": 1}, share_data=share_data
        )
    ]


def test_add_duplicate_id() -> None:
    manager, share_data = make_manager()
    events = record_events(manager)
    with pytest.raises(ValueError, match="ShareData 'doc' already exists"):
        manager.add_share_data(ShareData("doc"))
    assert manager.get_share_data_by_id("doc") is share_data
    assert events == []


def test_add_requires_share_data() -> None:
    manager = ShareDataManager()
    with pytest.raises(TypeError, match="expected a ShareData, got dict"):
        manager.add_share_data({"id": "doc"})  # type: ignore[arg-type]


def test_update_replaces_wholesale() -> None:
    manager, _ = make_manager()
    events = record_events(manager)
    replacement = ShareData("doc", current_state={"count": 10})
    manager.update_share_data(replacement)
    assert manager.get_share_data_by_id("doc") is replacement
    assert events == [
        ShareDataEvent(
            "share-data:updated",
            "doc",
            current_state={"count": 10},
            share_data=replacement,
        )
    ]


def test_update_unknown_id() -> None:
    manager = ShareDataManager()
    events = record_events(manager)
    with pytest.raises(KeyError, match="shareDataId doc not found"):
        manager.update_share_data(ShareData("doc"))
    assert manager.get_share_data_by_id("doc") is None
    assert events == []


def test_remove() -> None:
    manager, share_data = make_manager()
    events = record_events(manager)
    assert manager.remove_share_data_by_id("doc") is True
    assert manager.get_share_data_by_id("doc") is None
    assert events == [ShareDataEvent("share-data:removed", "doc", share_data=share_data)]
    assert events[0].current_state is None


def test_remove_unknown_id() -> None:
    manager, _ = make_manager()
    events = record_events(manager)
    assert manager.remove_share_data_by_id("nope") is False
    assert events == []


async def test_transaction_event_payload() -> None:
    manager, share_data = make_manager()
    events = record_events(manager)
    await manager.apply_transaction("doc", {"count": 1}, INCREMENT)
    await manager.apply_transaction("doc", {"count": 9}, INCREMENT)
    assert events == [
        ShareDataEvent(
            "share-data:transaction",
            "doc",
            transaction_id="1",
            accepted=True,
            current_state={"count": 1},
            share_data=share_data,
        ),
        ShareDataEvent(
            "share-data:transaction",
            "doc",
            transaction_id="2",
            accepted=False,
            current_state={"count": 1},
            share_data=share_data,
        ),
    ]


async def test_transaction_event_sees_recorded_history() -> None:
    manager, share_data = make_manager()
    snapshots: list[tuple[str | None, Any]] = []
    manager.on(
        "share-data:transaction",
        lambda event: snapshots.append(
            (event.share_data.last_transaction_id, event.share_data.current_state)
        ),
    )
    await manager.apply_transaction("doc", {"count": 1}, INCREMENT)
    assert snapshots == [("1", {"count": 1})]


# Listeners.


def test_on_rejects_unknown_events() -> None:
    manager = ShareDataManager()
    with pytest.raises(ValueError, match="unknown event 'share-data:change'"):
        manager.on("share-data:change", print)


def test_on_returns_listener() -> None:
    manager = ShareDataManager()

    def listener(event: ShareDataEvent) -> None:
        pass

    assert manager.on("share-data:added", listener) is listener


def test_off() -> None:
    manager = ShareDataManager()
    events: list[ShareDataEvent] = []
    manager.on("share-data:added", events.append)
    manager.off("share-data:added", events.append)
    manager.off("share-data:added", events.append)  # unknown: ignored
    manager.off("share-data:removed", print)
    manager.add_share_data(ShareData("doc"))
    assert events == []


async def test_raising_listener_does_not_break_others(caplog: pytest.LogCaptureFixture) -> None:
    manager, share_data = make_manager()
    received: list[str] = []

    def broken(event: ShareDataEvent) -> None:
        raise RuntimeError("listener bug")

    for name in ("share-data:transaction", "share-data:updated", "share-data:removed"):
        manager.on(name, broken)
        manager.on(name, lambda event: received.append(event.type))

    with caplog.at_level(logging.ERROR, logger="safe_fast"):
        outcome = await manager.apply_transaction("doc", {"count": 1}, INCREMENT)
        manager.update_share_data(ShareData("doc"))
        assert manager.remove_share_data_by_id("doc")

    assert outcome == TransactionOutcome(True, "1")
    assert share_data.current_state == {"count": 1}
    assert received == [
        "share-data:transaction",
        "share-data:updated",
        "share-data:removed",
    ]
    assert sum("listener bug" in str(r.exc_info[1]) for r in caplog.records) == 3


async def test_async_listeners_run(caplog: pytest.LogCaptureFixture) -> None:
    manager, _ = make_manager()
    received: list[ShareDataEvent] = []
    done = asyncio.Event()

    async def listener(event: ShareDataEvent) -> None:
        await asyncio.sleep(0)
        received.append(event)
        done.set()

    async def broken(event: ShareDataEvent) -> None:
        raise RuntimeError("async listener bug")

    manager.on("share-data:transaction", broken)
    manager.on("share-data:transaction", listener)
    with caplog.at_level(logging.ERROR, logger="safe_fast"):
        await manager.apply_transaction("doc", {"count": 1}, INCREMENT)
        await asyncio.wait_for(done.wait(), 1)
        await asyncio.sleep(0)
    assert [event.transaction_id for event in received] == ["1"]
    assert any("async listener bug" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_public_names() -> None:
    assert set(sharedata.__all__) == {
        "GENESIS_HASH",
        "RuleError",
        "ShareData",
        "ShareDataEvent",
        "ShareDataManager",
        "ShareFunction",
        "TransactionOutcome",
        "TransactionRecord",
    }
    assert issubclass(RuleError, Exception)


async def test_a_change_made_by_a_listener_reaches_every_listener_after_the_one_it_reacts_to() -> None:
    manager, _ = make_manager()
    seen: list[tuple[str, str]] = []

    def remove_on_transaction(event: ShareDataEvent) -> None:
        seen.append(("first", event.type))
        if event.type == "share-data:transaction":
            manager.remove_share_data_by_id("doc")
            # Delivered after this event has reached every listener, not inside this call.
            assert seen == [("first", "share-data:transaction")]

    def record(event: ShareDataEvent) -> None:
        seen.append(("second", event.type))

    for listener in (remove_on_transaction, record):
        manager.on("share-data:transaction", listener)
        manager.on("share-data:removed", listener)
    await manager.apply_transaction("doc", {"count": 1}, INCREMENT)
    assert seen == [
        ("first", "share-data:transaction"),
        ("second", "share-data:transaction"),
        ("first", "share-data:removed"),
        ("second", "share-data:removed"),
    ]


class _ReprHello:
    def __repr__(self) -> str:
        return "'hello'"


def _replace_key(old: Any, new: Any) -> Callable[[Any], None]:
    def edit(data: Any) -> None:
        data[new] = data.pop(old)

    return edit


def _set_item(key: Any, value: Any) -> Callable[[Any], None]:
    def edit(data: Any) -> None:
        data[key] = value

    return edit


@pytest.mark.parametrize(
    ("data", "edit"),
    [
        ({1: "a"}, _replace_key(1, "1")),
        ({True: "a"}, _replace_key(True, "true")),
        ({None: "a"}, _replace_key(None, "null")),
        ([float("nan"), 1], _set_item(0, "nan")),
        ({"s": {1, 2}}, _set_item("s", ["1", "2"])),
        ({"t": (1, 2)}, _set_item("t", [1, 2])),
        ({"o": _ReprHello()}, _set_item("o", "'hello'")),
    ],
    ids=["int-key", "bool-key", "none-key", "nan", "set", "tuple", "object"],
)
async def test_an_edit_json_alone_would_encode_alike_is_detected(data: Any, edit: Callable[[Any], None]) -> None:
    manager, share_data = make_manager()
    await manager.apply_transaction("doc", data, ACCEPT_ALL)
    assert share_data.verify_chain()
    edit(share_data.transaction_history[0].proposed_data)
    assert not share_data.verify_chain()


def _deeper(levels: int, call: Callable[[], Any]) -> Any:
    return call() if levels == 0 else _deeper(levels - 1, call)


def _nested(depth: int) -> list[Any]:
    data: list[Any] = []
    for _ in range(depth - 1):
        data = [data]
    return data


async def test_the_nesting_limit_is_the_same_at_any_call_depth() -> None:
    manager, share_data = make_manager()
    await manager.apply_transaction("doc", _nested(sharedata.MAX_NESTING), ACCEPT_ALL)
    # A record that could be made is verified as intact from a much deeper stack too.
    assert [_deeper(levels, share_data.verify_chain) for levels in (0, 50, 200)] == [True, True, True]
    with pytest.raises(ValueError, match="nested too deeply"):
        await manager.apply_transaction("doc", _nested(sharedata.MAX_NESTING + 1), ACCEPT_ALL)
    assert len(share_data.transaction_history) == 1


async def test_a_rule_whose_state_keeps_changing_under_it_gives_up() -> None:
    manager, share_data = make_manager()
    evaluations = 0

    async def slow_rule(current: Any, proposed: Any) -> bool:
        nonlocal evaluations
        evaluations += 1
        share_data.current_state = {"count": -evaluations}  # changed directly, behind the manager's back
        await asyncio.sleep(0)
        return True

    with pytest.raises(RuntimeError, match="changed while the rule"):
        await manager.apply_transaction("doc", {"count": 1}, ShareFunction("slow", slow_rule))
    assert evaluations == sharedata.MAX_EVALUATIONS
    assert share_data.transaction_history == []


async def test_changes_queued_by_a_listener_still_reach_everyone_when_a_listener_escapes() -> None:
    manager, _ = make_manager()
    removed: list[str] = []

    class Abort(BaseException):
        pass

    def remove_then_escape(event: ShareDataEvent) -> None:
        manager.remove_share_data_by_id("doc")
        raise Abort("listener gives up")

    manager.on("share-data:transaction", remove_then_escape)
    manager.on("share-data:removed", lambda event: removed.append(event.share_data_id))
    with pytest.raises(Abort):
        await manager.apply_transaction("doc", {"count": 1}, INCREMENT)
    assert removed == ["doc"]  # the removal happened: its listeners heard of it
