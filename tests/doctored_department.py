"""A department whose train replies lie — for tests only, never part of the product.

``python tests/doctored_department.py --doctor HOW department start ...`` runs
``fedsilo department start ...`` unchanged, except that the executor's
ClientApp is the installed one wrapped: it trains (and charges its ledger) as
usual, then changes one thing in its reply before it leaves.

HOW:

* ``head-epsilon-nan`` — the signed ledger head states ε = NaN, signed with
  the department's own registered key, so its signature verifies;
* ``num-examples-inf`` — the metrics say ``num-examples`` = ∞;
* ``no-name`` — the status record has no ``name``.
"""

from __future__ import annotations

import json
import sys

from flwr.app import ConfigRecord

import fedsilo.client.executor as executor
from fedsilo.shared.protocol import METRICS_KEY, STATUS_KEY
from fedsilo.shared.record import HEAD_KEY
from fedsilo.shared.signing import Signer


def _sign_nan_epsilon(reply, context) -> None:
    body = {key: value for key, value in reply.content[HEAD_KEY].items() if key != "signature"}
    body["epsilon"] = float("nan")
    payload = b"fedsilo-ledger-head-v1:" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    signer = Signer.from_file(context.node_config["identity-key"])
    reply.content[HEAD_KEY] = ConfigRecord({**body, "signature": signer.sign(payload)})


def _infinite_size(reply, context) -> None:
    reply.content[METRICS_KEY]["num-examples"] = float("inf")


def _no_name(reply, context) -> None:
    status = {key: value for key, value in reply.content[STATUS_KEY].items() if key != "name"}
    reply.content[STATUS_KEY] = ConfigRecord(status)


DOCTORS = {"head-epsilon-nan": _sign_nan_epsilon, "num-examples-inf": _infinite_size, "no-name": _no_name}


def doctored(load, doctor):
    """An app loader: the installed ClientApp, its every reply with a head passed through ``doctor``."""
    def load_doctored(*args):
        app = load(*args)

        def answer(message, context):
            reply = app(message=message, context=context)
            if not reply.has_error() and HEAD_KEY in reply.content:
                doctor(reply, context)
            return reply

        return answer

    return load_doctored


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "--doctor" or argv[1] not in DOCTORS:
        raise SystemExit(f"usage: doctored_department.py --doctor {{{','.join(DOCTORS)}}} department start ...")
    # The executor looks its app loader up when it starts: wrap it before the CLI runs.
    executor._installed_clientapp = doctored(executor._installed_clientapp, DOCTORS[argv[1]])
    from fedsilo.cli import main as fedsilo

    sys.argv = ["fedsilo", *argv[2:]]
    fedsilo()


if __name__ == "__main__":
    main(sys.argv[1:])
