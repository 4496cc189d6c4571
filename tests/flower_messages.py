"""Hand-made Flower messages for strategy tests: train requests and department replies."""

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict


class Grid:
    """Just enough of a Flower Grid for a strategy's ``configure_train``."""

    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return self.ids


def reply(request, name, weights=None, n=10, status="trained", eps=1.0, key="w"):
    """A department's reply to ``request``: an update (``weights``) or a refusal."""
    content = {
        "metrics": MetricRecord({"num-examples": n if status == "trained" else 0, "epsilon": eps, "steps": 3, "noise-multiplier": 1.0, "sample-rate": 0.1}),
        "department": ConfigRecord({"name": name, "status": status, "reason": "budget" if status == "refused" else ""}),
    }
    if weights is not None:
        content["arrays"] = ArrayRecord({key: Array(weights)})
    return Message(RecordDict(content), reply_to=request)
