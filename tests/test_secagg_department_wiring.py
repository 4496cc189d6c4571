"""The department's ClientApp under secure aggregation: real Flower messages from a real CoordinatorSession."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from secagg_federation import signer
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsilo.client import app as client_app
from fedsilo.client.department import Department
from fedsilo.client.policy import DepartmentPolicy, PolicyError, read_peers
from fedsilo.client.secagg_store import FOLDER
from fedsilo.client.secure_aggregation import NO_ROSTER, REQUIRED, answer_query
from fedsilo.secagg import CoordinatorSession, DepartmentSession, FixedPointCodec, ProtocolViolation
from fedsilo.secagg import DepartmentPolicy as SessionPolicy
from fedsilo.secagg import records
from fedsilo.secagg.messages import Advertisement, MaskedInput, ShareRequest, Shares, Unmasking
from fedsilo.shared.config import RUN_CONFIG_DEFAULTS
from fedsilo.shared.data import federation_data_test
from fedsilo.shared.models import build_model
from fedsilo.shared.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, STATUS_KEY
from fedsilo.shared.record import HEAD_KEY, LedgerHead, public_key_line
from fedsilo.shared.signing import Signer, generate_identity, simulated_identity

N = 3
RUN = "run-secagg"
SECAGG = records.RECORD_NAME


class Federation:
    """N simulated departments behind one real ClientApp, and a coordinator session driving them."""

    def __init__(self, root: Path, policy: DepartmentPolicy | None = None, rounds: int = 3) -> None:
        self.run_config = {**RUN_CONFIG_DEFAULTS, "out": str(root / "run"), "num-server-rounds": rounds,
                           "local-epochs": 1}
        if policy is not None:
            self.run_config["simulated-policy"] = policy.to_json()
        self.app = client_app.department_app()
        # The names they go by, as a simulation's coordinator learns them.
        self.names = [self.send(i, records.ACTION_HELLO, {SECAGG: records.hello_record()}).content[STATUS_KEY]["name"]
                      for i in range(N)]
        test = federation_data_test("digits", "label", ())
        model = build_model("auto", test.input_shape, test.num_classes, test.kind, seed=42)
        self.global_arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        self.ledger_dir = root / "run" / "ledgers"

    def context(self, i: int) -> Context:
        return Context(run_id=1, node_id=i + 1, node_config={"partition-id": i, "num-partitions": N},
                       state=RecordDict(), run_config=self.run_config)

    def send(self, i: int, action: str, content: dict) -> Message:
        msg = Message(RecordDict(content), dst_node_id=i + 1, message_type=action)
        return self.app(message=msg, context=self.context(i))

    def query(self, i: int, action: str, request) -> Message:
        return self.send(i, action, {SECAGG: records.to_record(request)})

    def codec(self) -> FixedPointCodec:
        return FixedPointCodec(FixedPointCodec.layout_of(self.global_arrays), 1.0, 16, 1048576, N)

    def open_session(self, first_round: int = 1, window: int = 3) -> CoordinatorSession:
        codec = self.codec()
        coord = CoordinatorSession(RUN, 3, self.names, codec.modulus_bits, codec.vector_length,
                                   first_round=first_round, window=window)
        request = coord.advertise_request()
        for i in range(N):
            coord.receive_advertisement(ok(self.query(i, records.ACTION_ADVERTISE, request), Advertisement))
        share_request = coord.share_request()
        for i in range(N):
            coord.receive_shares(ok(self.query(i, records.ACTION_SHARE, share_request), Shares))
        return coord

    def train(self, i: int, server_round: int, mask_request=None) -> Message:
        content = {ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in self.global_arrays.items()}),
                   CONFIG_KEY: ConfigRecord({"server-round": server_round, "run-key": RUN})}
        if mask_request is not None:
            content[SECAGG] = records.to_record(mask_request)
        return self.send(i, "train", content)

    def state_files(self) -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in sorted((self.ledger_dir / FOLDER).glob("*.state"))}


def ok(reply: Message, cls):
    status = reply.content[STATUS_KEY]
    assert status["status"] == "ok", status["reason"]
    return records.from_record(reply.content[SECAGG], cls)


def declined(reply: Message, match: str) -> str:
    assert not reply.has_error()
    status = reply.content[STATUS_KEY]
    assert status["status"] == "declined" and match in status["reason"], dict(status)
    assert ARRAYS_KEY not in reply.content and SECAGG not in reply.content
    return status["reason"]


def charged(reply: Message) -> int:
    """The ledger length its signed head states."""
    return LedgerHead.from_record(reply.content[HEAD_KEY]).seq


@pytest.fixture
def captured(monkeypatch):
    """What each department trained, as the app hands it to the masking step (the test's ground truth)."""
    seen: dict[str, tuple[dict, int]] = {}
    real = client_app.masked_reply

    def spy(msg, plan, department, trained, metrics):
        seen[department.name] = ({k: np.array(v) for k, v in trained.items()}, plan.weight)
        return real(msg, plan, department, trained, metrics)

    monkeypatch.setattr(client_app, "masked_reply", spy)
    return seen


def test_a_masked_round_sums_to_the_weighted_mean_and_is_never_masked_twice(tmp_path, serverapp_identity,
                                                                            captured):
    fed = Federation(tmp_path)
    hello = fed.send(0, records.ACTION_HELLO, {SECAGG: records.hello_record()})
    assert dict(hello.content[STATUS_KEY]) == {"name": fed.names[0], "status": "ok", "reason": ""}
    assert SECAGG not in hello.content
    coord = fed.open_session()
    heads = {}
    for i, name in enumerate(fed.names):
        reply = fed.train(i, 1, coord.mask_request(name, 1))
        assert reply.content[STATUS_KEY]["status"] == "trained" and ARRAYS_KEY not in reply.content
        head = LedgerHead.from_record(reply.content[HEAD_KEY])
        assert head.problem() == "" and head.seq == 1 and head.run_id == RUN
        heads[name] = head.seq
        coord.receive_masked(records.from_record(reply.content[SECAGG], MaskedInput))
    assert coord.consistency_request(1) is None  # nobody dropped
    unmask = coord.unmask_request(1)
    for i in range(N):
        coord.receive_unmasking(ok(fed.query(i, records.ACTION_UNMASK, unmask), Unmasking))
    mean, total_weight = fed.codec().decode(coord.unmask(1))
    weights = {name: w for name, (_, w) in captured.items()}
    assert total_weight == sum(weights.values())
    for key, start in fed.global_arrays.items():
        expected = sum(w * np.clip(captured[name][0][key].astype(np.float64) - start, -1, 1)
                       for name, (_, w) in captured.items()) / total_weight
        assert np.max(np.abs(mean[key] - expected)) <= fed.codec().max_error(total_weight)

    # The state: 0600 files in a 0700 folder, one per department.
    files = fed.state_files()
    assert len(files) == N and stat.S_IMODE((fed.ledger_dir / FOLDER).stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)

    # A new process (a new app): round 1 again is declined before training, nothing charged ...
    fed.app = client_app.department_app()
    again = fed.train(0, 1, coord.mask_request(fed.names[0], 1))
    declined(again, "already masked")
    assert charged(again) == heads[fed.names[0]]
    # Nor is a plain update of it sent beside the masked one.
    plain = fed.train(0, 1)
    declined(plain, "sends no plain update of a masked round")
    assert charged(plain) == heads[fed.names[0]]
    # ... while the saved session goes on with round 2.
    reply = fed.train(1, 2, coord.mask_request(fed.names[1], 2))
    assert reply.content[STATUS_KEY]["status"] == "trained" and charged(reply) == 2

    # A new session for the same run (a resume) refuses the rounds masked in the old one.
    fresh = fed.open_session(first_round=1, window=3)
    old_round = fed.train(1, 2, fresh.mask_request(fed.names[1], 2))
    declined(old_round, "already masked")
    assert charged(old_round) == 2
    reply = fed.train(1, 3, fresh.mask_request(fed.names[1], 3))
    assert reply.content[STATUS_KEY]["status"] == "trained" and charged(reply) == 3


def test_tampered_replayed_or_substituted_messages_are_declined_and_change_nothing(tmp_path, serverapp_identity):
    fed = Federation(tmp_path)
    coord = fed.open_session()
    before = fed.state_files()
    # Replayed: a session deals once.
    share_request = ShareRequest(RUN, coord.params.session_id, tuple(coord.advertisements.values()))
    declined(fed.query(0, records.ACTION_SHARE, share_request), "already dealt")
    # Tampered bytes: the record does not parse.
    raw = records.to_record(coord.mask_request(fed.names[0], 1))
    kind = next(iter(raw.keys()))
    bad = ConfigRecord({kind: raw[kind][:-3] + b"xyz"})
    reply = fed.send(0, "train", {ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in fed.global_arrays.items()}), SECAGG: bad,
                                  CONFIG_KEY: ConfigRecord({"server-round": 1, "run-key": RUN})})
    declined(reply, "does not authenticate")
    assert charged(reply) == 0
    # Substituted: another department's mask request (its ciphertexts are not addressed to dept-0).
    reply = fed.train(0, 1, coord.mask_request(fed.names[1], 1))
    declined(reply, "share ciphertexts")
    assert charged(reply) == 0
    # A consistency request for a round never masked; a query of the wrong kind.
    declined(fed.send(0, records.ACTION_CONSISTENCY, {SECAGG: raw}), "holds exactly the key")
    assert fed.state_files() == before


def test_a_policy_requiring_secure_aggregation_declines_a_plain_round_before_training(tmp_path, serverapp_identity):
    fed = Federation(tmp_path, DepartmentPolicy(max_epsilon=10.0, require_secure_aggregation=True))
    reply = fed.train(0, 1)
    declined(reply, REQUIRED)
    assert charged(reply) == 0 and METRICS_KEY in reply.content


def test_without_a_roster_every_query_is_declined_with_how_to_give_one(tmp_path, serverapp_identity):
    signer = simulated_identity(tmp_path, "solo")
    department = Department("solo", None, tmp_path, DepartmentPolicy(max_epsilon=1.0), tmp_path / "solo.key")
    msg = Message(RecordDict({SECAGG: records.hello_record()}), dst_node_id=1, message_type=records.ACTION_HELLO)
    for action in (records.ACTION_HELLO, records.ACTION_ADVERTISE):
        reason = declined(answer_query(msg, department, action), "--peers DIR")
        assert reason == NO_ROSTER
    assert signer.fingerprint and not (tmp_path / FOLDER).exists()


def test_a_wired_department_requires_2t_above_n_plus_c():
    names = [f"d{i}" for i in range(5)]
    signers = {n: signer(n) for n in names}
    roster = {n: s.public_key for n, s in signers.items()}
    policy = SessionPolicy(min_threshold=3, majority_rule=True)
    for t, accepted in ((3, False), (4, True)):
        coord = CoordinatorSession(RUN, t, names, 32, 8)
        session = DepartmentSession("d0", signers["d0"], roster, policy)
        if accepted:
            assert session.advertise(coord.advertise_request()).name == "d0"
        else:
            with pytest.raises(ProtocolViolation, match=r"2t > n \+ c"):
                session.advertise(coord.advertise_request())
    # The bare protocol (no rule asked) keeps its old bounds.
    DepartmentSession("d0", signers["d0"], roster).advertise(CoordinatorSession(RUN, 3, names, 32, 8).advertise_request())


def test_the_policy_carries_the_roster_and_old_policies_still_load(tmp_path):
    keys = tmp_path / "peers"
    for name in ("a", "b", "c"):
        generate_identity(tmp_path / f"{name}.key", keys / f"{name}.pub", name)
    own = signer("unused")  # a key that is nobody's in the folder
    with pytest.raises(PolicyError, match="no such folder"):
        read_peers(tmp_path / "nowhere", "a", own.public_key)
    a = Signer.from_file(tmp_path / "a.key")
    peers = read_peers(keys, "a", a.public_key)
    assert [n for n, _ in peers] == ["a", "b", "c"] and dict(peers)["a"] == public_key_line(a.public_key)
    with pytest.raises(PolicyError, match="differs"):
        read_peers(keys, "a", own.public_key)
    with pytest.raises(PolicyError, match="own d.pub is not there"):
        read_peers(keys, "d", own.public_key)
    (keys / "z.pub").write_text("not a key\n")
    with pytest.raises(PolicyError, match="z.pub"):
        read_peers(keys, "a", a.public_key)

    policy = DepartmentPolicy(max_epsilon=2.0, require_secure_aggregation=True, peers=peers, secagg_min_threshold=4)
    assert DepartmentPolicy.from_json(policy.to_json()) == policy
    assert set(policy.roster()) == {"a", "b", "c"}
    old = json.loads(DepartmentPolicy(max_epsilon=2.0).to_json())
    for key in ("peers", "require_secure_aggregation", "secagg_min_threshold"):
        del old[key]
    assert DepartmentPolicy.from_json(json.dumps(old)) == DepartmentPolicy(max_epsilon=2.0)
    with pytest.raises(PolicyError, match="secagg-min-threshold"):
        DepartmentPolicy(max_epsilon=2.0, secagg_min_threshold=1)
    with pytest.raises(PolicyError, match="does not parse"):
        DepartmentPolicy(max_epsilon=2.0, peers=(("a", "ssh-ed nonsense"),))


def test_department_start_checks_its_roster_before_joining(tmp_path):
    from typer.testing import CliRunner

    from fedsilo.client.cli import app

    keys = tmp_path / "departments"
    generate_identity(keys / "finance", keys / "finance.pub", "finance")
    base = ["--coordinator", "127.0.0.1:1", "--ca", str(tmp_path / "ca.crt"), "--key", str(keys / "finance"),
            "--data", str(tmp_path / "t.csv"), "--ledger", str(tmp_path / "ledger"), "--max-epsilon", "5"]
    for extra, text in ((["--require-secure-aggregation"], "needs --peers DIR"),
                        (["--peers", str(tmp_path / "nowhere")], "no such folder"),
                        (["--peers", str(tmp_path)], "holds no NAME.pub"),
                        (["--peers", str(keys), "--name", "hr"], "own hr.pub is not there"),
                        (["--peers", str(keys), "--secagg-min-threshold", "1"], "secagg-min-threshold")):
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 2 and text in " ".join(result.output.split()), result.output


def test_a_declined_reason_is_cut_where_the_coordinator_cuts_it():
    from fedsilo.client import secure_aggregation
    from fedsilo.server.replies import MAX_REASON_LENGTH

    assert secure_aggregation.MAX_REASON_LENGTH == MAX_REASON_LENGTH
