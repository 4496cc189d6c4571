"""What a department's ClientApp sends back: the weights, its ε and the mechanism — no training loss."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsilo.client.app import app
from fedsilo.shared.config import RUN_CONFIG_DEFAULTS
from fedsilo.shared.data import federation_data_test
from fedsilo.shared.models import build_model
from fedsilo.shared.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, STATUS_KEY


def test_a_train_reply_carries_no_unnoised_statistic(tmp_path, serverapp_identity):
    run_config = {**RUN_CONFIG_DEFAULTS, "out": str(tmp_path / "run")}
    test = federation_data_test("digits", "label", ())
    model = build_model("auto", test.input_shape, test.num_classes, test.kind, seed=42)
    request = Message(
        RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()), CONFIG_KEY: ConfigRecord({"server-round": 1})}),
        dst_node_id=7, message_type="train",
    )
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=run_config)
    reply = app(message=request, context=context)
    assert not reply.has_error() and reply.content[STATUS_KEY]["status"] == "trained"
    metrics = dict(reply.content[METRICS_KEY])
    assert set(metrics) == {"num-examples", "epsilon", "max-epsilon", "delta", "steps", "noise-multiplier", "sample-rate", "replayed-seq"}
    assert 0 < metrics["epsilon"] < float("inf")  # the whole-history ε the guard wrote to the ledger
