"""The train request: one typed definition, built by the coordinator and read strictly by the department."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from fedsilo.shared.protocol import RUN_KEY
from fedsilo.shared.record import ACK_HEAD_KEY, ACK_SEQ_KEY
from fedsilo.shared.train_request import (
    REQUEST_VERSION, REQUEST_VERSION_KEY, ROUND_KEY, MalformedRequest, TrainRequest,
)

HEAD = "0123456789abcdef" * 4


@pytest.mark.parametrize("request_", [
    TrainRequest("run-a", 3),
    TrainRequest("run-a", 3, (5, HEAD)),
    TrainRequest("run-a", 1, (0, "")),  # an empty ledger's head, acknowledged
    TrainRequest(),
])
def test_a_request_round_trips_through_a_config_record(request_):
    config = ConfigRecord(request_.to_config())
    assert TrainRequest.from_config(config) == request_
    assert config[REQUEST_VERSION_KEY] == REQUEST_VERSION and config[ROUND_KEY] == request_.server_round


def test_each_department_gets_its_own_acknowledged_head_and_the_same_run():
    shared = TrainRequest("run-a", 2)
    mine = shared.acknowledging((4, HEAD))
    assert (mine.run_key, mine.server_round, mine.acknowledged) == ("run-a", 2, (4, HEAD))
    assert shared.acknowledging(None).to_config().keys() == {REQUEST_VERSION_KEY, RUN_KEY, ROUND_KEY}


def test_a_request_of_fedsilo_0_4_reads_as_version_1_and_flowers_keys_are_left_alone():
    config = {ROUND_KEY: 4, RUN_KEY: "run-a", ACK_SEQ_KEY: 2, ACK_HEAD_KEY: HEAD, "flower-own-key": 1.5}
    assert TrainRequest.from_config(config) == TrainRequest("run-a", 4, (2, HEAD), 1)
    assert TrainRequest.from_config({}) == TrainRequest("", 0, None)  # no run key: the guard uses Flower's run id


@pytest.mark.parametrize("config,field", [
    ({ROUND_KEY: "3"}, ROUND_KEY),
    ({ROUND_KEY: True}, ROUND_KEY),
    ({ROUND_KEY: -1}, ROUND_KEY),
    ({ROUND_KEY: 2**60}, ROUND_KEY),
    ({RUN_KEY: 12}, RUN_KEY),
    ({ACK_SEQ_KEY: -1, ACK_HEAD_KEY: ""}, ACK_SEQ_KEY),
    ({ACK_SEQ_KEY: 1.0, ACK_HEAD_KEY: HEAD}, ACK_SEQ_KEY),
    ({ACK_SEQ_KEY: 1, ACK_HEAD_KEY: HEAD.upper()}, ACK_HEAD_KEY),
    ({ACK_SEQ_KEY: 1, ACK_HEAD_KEY: "not hex" * 9}, ACK_HEAD_KEY),
    ({ACK_SEQ_KEY: 1, ACK_HEAD_KEY: HEAD + "0"}, ACK_HEAD_KEY),  # over-long
    ({ACK_SEQ_KEY: 1, ACK_HEAD_KEY: ""}, ACK_HEAD_KEY),
    ({ACK_SEQ_KEY: 0, ACK_HEAD_KEY: HEAD}, ACK_HEAD_KEY),
    ({ACK_SEQ_KEY: 1, ACK_HEAD_KEY: b"\x00" * 32}, ACK_HEAD_KEY),
    ({ACK_SEQ_KEY: 1}, ACK_HEAD_KEY),
    ({ACK_HEAD_KEY: HEAD}, ACK_SEQ_KEY),
    ({REQUEST_VERSION_KEY: "1"}, REQUEST_VERSION_KEY),
    ({REQUEST_VERSION_KEY: 0}, REQUEST_VERSION_KEY),
])
def test_a_tampered_field_is_refused_by_name(config, field):
    with pytest.raises(MalformedRequest, match=field):
        TrainRequest.from_config(config)


def test_a_newer_request_version_is_refused_with_what_to_do():
    with pytest.raises(MalformedRequest, match=r"version 2 request.*upgrade fedsilo on the department"):
        TrainRequest.from_config({REQUEST_VERSION_KEY: REQUEST_VERSION + 1, ROUND_KEY: 1})


def test_the_coordinator_cannot_build_a_malformed_request():
    with pytest.raises(MalformedRequest, match=ROUND_KEY):
        TrainRequest("run-a", -1)
    with pytest.raises(MalformedRequest, match=ACK_HEAD_KEY):
        TrainRequest("run-a", 1, (3, "abc"))
