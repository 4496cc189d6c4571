"""Every secure-aggregation message survives a trip through a Flower ConfigRecord, and a record
of the wrong kind, with a missing key or extra keys is refused."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord
from flwr.app.metadata import validate_message_type
from secagg_federation import federation

from fedsilo.secagg import MalformedMessage
from fedsilo.secagg import records
from fedsilo.secagg.messages import MESSAGE_TYPES, Advertisement, MaskRequest


def _one_of_each_kind() -> dict:
    """A real message of every kind, from a round with a dropout (so a consistency step runs)."""
    fed = federation(n=4, t=3, window=1, length=8)
    coord, depts = fed.coordinator, fed.departments
    seen = {}

    def keep(message):
        seen[type(message)] = message
        return message

    request = keep(coord.advertise_request())
    for name in fed.names:
        coord.receive_advertisement(keep(depts[name].advertise(request)))
    share_request = keep(coord.share_request())
    for name in fed.names:
        coord.receive_shares(keep(depts[name].share(share_request)))
    inputs = fed.inputs()
    for name in fed.names[:3]:
        coord.receive_masked(keep(depts[name].mask(keep(coord.mask_request(name, 0)), inputs[name])))
    coord.mask_request("dept3", 0)   # dept3 drops before masking
    consistency = keep(coord.consistency_request(0))
    for name in fed.names[:3]:
        coord.receive_consistency(keep(depts[name].sign_responders(consistency)))
    keep(depts["dept0"].unmask(keep(coord.unmask_request(0))))
    assert set(seen) == set(MESSAGE_TYPES)
    return seen


def test_every_message_kind_round_trips_through_a_config_record():
    for cls, message in _one_of_each_kind().items():
        record = records.to_record(message)
        assert isinstance(record, ConfigRecord) and list(record) == [records.KINDS[cls]]
        assert records.from_record(record, cls) == message


def test_a_record_of_another_kind_or_with_other_keys_is_refused():
    adv = _one_of_each_kind()[Advertisement]
    record = records.to_record(adv)
    with pytest.raises(MalformedMessage, match="exactly the key 'secagg-mask-request'"):
        records.from_record(record, MaskRequest)
    with pytest.raises(MalformedMessage, match="not \\[\\]"):
        records.from_record(ConfigRecord({}), Advertisement)
    extra = ConfigRecord({"secagg-advertisement": adv.to_bytes(), "note": b"x"})
    with pytest.raises(MalformedMessage, match="exactly the key"):
        records.from_record(extra, Advertisement)
    with pytest.raises(MalformedMessage, match="must be bytes"):
        records.from_record(ConfigRecord({"secagg-advertisement": "text"}), Advertisement)
    with pytest.raises(MalformedMessage, match="ConfigRecord"):
        records.from_record({"secagg-advertisement": adv.to_bytes()}, Advertisement)
    # The right key but another message's bytes inside: the message parser refuses it.
    with pytest.raises(MalformedMessage, match="expected a Advertisement"):
        records.from_record(ConfigRecord({"secagg-advertisement": _one_of_each_kind()[MaskRequest].to_bytes()}),
                            Advertisement)
    with pytest.raises(TypeError):
        records.to_record("not a message")


def test_saved_state_round_trips_and_action_names_are_valid_flower_message_types():
    assert records.state_from_record(records.state_to_record(b"state")) == b"state"
    with pytest.raises(MalformedMessage):
        records.state_from_record(ConfigRecord({"other": b"state"}))
    assert len(set(records.ACTIONS)) == 4 and all(validate_message_type(a) for a in records.ACTIONS)
    assert len(set(records.KINDS.values())) == len(MESSAGE_TYPES)
