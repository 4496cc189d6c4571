"""The department's side of secure aggregation in Flower messages (docs/explanation/secure-aggregation.md).

Two pieces, both around :class:`~fedsilo.secagg.DepartmentSession`, whose state
lives in the department's durable store (:mod:`fedsilo.client.secagg_store`):

* :func:`query_handler` answers the coordinator's five queries (hello,
  advertise, share, consistency, unmask): it loads the session, answers, saves,
  and only then replies; a protocol error or a policy refusal is a ``declined``
  reply in fedsilo's own words.
* :func:`check_mask_request` (called by the budget guard before training) and
  :func:`masked_reply` (called by the train handler after it) mask a round's
  update: Δ = trained − global, fixed-point encoded with the department's
  reported size as weight, masked, saved, and sent without the weights.

A department masks each round of a run at most once, ever: every masked round is
kept in the store across sessions, and a request for one is declined before training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedsilo.secagg import DepartmentPolicy as SessionPolicy
from fedsilo.secagg import DepartmentSession, FixedPointCodec, SecAggError
from fedsilo.secagg import records
from fedsilo.secagg.messages import (AdvertiseRequest, ConsistencyRequest, MaskRequest, ShareRequest,
                                     UnmaskRequest)
from fedsilo.secagg.session import SessionParams
from fedsilo.shared.config import RunSettings
from fedsilo.shared.distributed_dp import DistributedDpPlan
from fedsilo.shared.protocol import (ARRAYS_KEY, MAX_REASON_LENGTH, METRICS_KEY, STATUS_DECLINED, STATUS_KEY, STATUS_OK,
                                     STATUS_TRAINED)

from .department import Department
from .secagg_store import SecAggStore, StoredRun, StoreError

log = logging.getLogger("fedsilo.department")

RECORD_NAME = records.RECORD_NAME
NO_ROSTER = ("secure aggregation: this department has no roster of its peers; its operators give one with "
             "`fedsilo department start --peers DIR` (DIR holds every department's NAME.pub, as `fedsilo certs "
             "add-department` writes them)")
REQUIRED = "this department requires secure aggregation"
DDP_NEEDS_SECAGG = ("distributed DP: the run asked for a plain update; this department adds only its share of the "
                    "noise, so its contribution leaves only inside a secure sum")
UNREADABLE_STATE = ("secure aggregation: this department's saved session cannot be read; its operators can read "
                    "why in its log")

# query action -> (request type, the DepartmentSession method that answers it)
_QUERIES = {
    records.ACTION_ADVERTISE: (AdvertiseRequest, "advertise"),
    records.ACTION_SHARE: (ShareRequest, "share"),
    records.ACTION_CONSISTENCY: (ConsistencyRequest, "sign_responders"),
    records.ACTION_UNMASK: (UnmaskRequest, "unmask"),
}
QUERY_ACTIONS = (records.ACTION_HELLO, *_QUERIES)


class SecAggRefusal(ValueError):
    """This department's policy (or state) refuses a secure-aggregation step; the text is fedsilo's own."""


# ---------------------------------------------------------------------------------------- shared pieces
def session_policy(department: Department) -> SessionPolicy:
    """What the department's own policy accepts of a session: its threshold, and 2t > n + c."""
    return SessionPolicy(min_threshold=department.policy.secagg_min_threshold, majority_rule=True)


def roster(department: Department) -> dict:
    """The department's roster (name -> identity key), with its own key under its own name."""
    peers = department.policy.roster()
    if not peers:
        raise SecAggRefusal(NO_ROSTER)
    own = peers.get(department.name)
    if own is None or own.public_numbers() != department.signer.public_key.public_numbers():
        raise SecAggRefusal(f"secure aggregation: this department's roster has no key of its own under "
                            f"'{department.name}', or another one; its operators fix --peers")
    return peers


def store_for(department: Department, run_key: str) -> SecAggStore:
    return SecAggStore(department.ledger_dir, department.signer.fingerprint, run_key)


def load(department: Department, store: SecAggStore, peers: dict) -> tuple[StoredRun, DepartmentSession | None]:
    """The stored run and its session (None before the first AdvertiseRequest)."""
    try:
        stored = store.load()
    except StoreError as err:
        log.error("[%s] %s", department.name, err)
        raise SecAggRefusal(UNREADABLE_STATE) from None
    if stored.session is None:
        return stored, None
    return stored, DepartmentSession.from_state(stored.session, department.signer, peers, session_policy(department))


def declined(msg: Message, department: Department, reason: str) -> Message:
    """The query refusal of the contract: only the status record, in fedsilo's words."""
    status = ConfigRecord({"name": department.name, "status": STATUS_DECLINED, "reason": reason[:MAX_REASON_LENGTH]})
    return Message(RecordDict({STATUS_KEY: status}), reply_to=msg)


def _ok(department: Department) -> ConfigRecord:
    return ConfigRecord({"name": department.name, "status": STATUS_OK, "reason": ""})


# ---------------------------------------------------------------------------------------- queries
def answer_query(msg: Message, department: Department, action: str) -> Message:
    """Answer one secure-aggregation query; the state is saved before the reply leaves."""
    try:
        peers = roster(department)
        record = msg.content.config_records.get(RECORD_NAME)
        if action == records.ACTION_HELLO:
            records.read_hello(record)
            return Message(RecordDict({STATUS_KEY: _ok(department)}), reply_to=msg)
        cls, method = _QUERIES[action]
        request = records.from_record(record, cls)
        over = department.policy.limits.check_run_key(request.run_key)
        if over:
            raise SecAggRefusal("; ".join(over))
        store = store_for(department, request.run_key)
        stored, session = load(department, store, peers)
        if cls is AdvertiseRequest and (session is None or session.params != SessionParams.from_request(request)):
            # A new session for the run replaces the old one (its secrets go); the masked rounds stay.
            session = DepartmentSession(department.name, department.signer, peers, session_policy(department))
        if session is None:
            raise SecAggRefusal("secure aggregation: no session for this run here; the AdvertiseRequest comes first")
        answer = getattr(session, method)(request)
        store.save(StoredRun(session.to_state(), stored.masked_rounds))
    except (SecAggError, SecAggRefusal) as err:
        log.warning("[%s] %s declined: %s", department.name, action, err)
        return declined(msg, department, str(err))
    return Message(RecordDict({RECORD_NAME: records.to_record(answer), STATUS_KEY: _ok(department)}), reply_to=msg)


def query_handler(resolve, action: str):
    """A ClientApp query function for ``action``; ``resolve(context)`` gives the department."""
    if action not in QUERY_ACTIONS:
        raise ValueError(f"{action} is not a secure-aggregation query")

    def handle(msg: Message, context: Context) -> Message:
        return answer_query(msg, resolve(context), action)

    handle.__name__ = handle.__qualname__ = action.replace(".", "_")
    return handle


# ---------------------------------------------------------------------------------------- masking
@dataclass(frozen=True)
class MaskPlan:
    """A masked round the guard admitted: the request, where it is saved, and its codec."""

    request: MaskRequest
    store: SecAggStore
    stored: StoredRun
    codec: FixedPointCodec | DistributedDpPlan
    weight: int


def codec_for(settings: RunSettings, layout, participants: int) -> FixedPointCodec:
    """The department's codec for the run's department-scope settings (see docs/reference/settings.md)."""
    return FixedPointCodec(layout, settings.secagg_bound, settings.secagg_frac_bits, settings.secagg_max_weight,
                           participants)


def distributed_plan(settings: RunSettings, layout, params: SessionParams, department: Department) -> DistributedDpPlan:
    """The run's distributed-DP round as this department derives it, or ``SecAggRefusal`` naming what it declines.

    Every number comes from the run's settings, the model's layout and the session this
    department agreed to: its threshold t and participants n.  The run's colluder
    assumption c may not be below this department's own.  Record level (``distributed-dp``):
    one DP-SGD step over the pooled records; client level (``central-dp``): this
    department's whole update, clipped and noised here.
    """
    floor = department.policy.ddp_min_colluders
    if settings.ddp_colluders < floor:
        raise SecAggRefusal(f"distributed DP: the run assumes {settings.ddp_colluders} colluding department(s); this "
                            f"department's policy assumes at least {floor} (--ddp-min-colluders), so each share would "
                            "be too small")
    if settings.central_dp:
        return DistributedDpPlan.client_level(layout, settings, len(params.participants), params.threshold)
    if settings.local_epochs != 1:
        raise SecAggRefusal("distributed DP: a round is one DP-SGD step; this department declines local-epochs "
                            f"{settings.local_epochs}")
    return DistributedDpPlan.for_run(layout, settings, len(params.participants), params.threshold)  # checks c < t


def check_mask_request(msg: Message, department: Department, settings: RunSettings, run_id: str,
                       server_round: int, weight: int) -> MaskPlan | None:
    """Before training: None for a plain round this policy allows, else the admitted :class:`MaskPlan`.

    Raises :class:`SecAggRefusal` (or a ``SecAggError``) for a round to decline before training:
    a plain request under ``--require-secure-aggregation`` or for a round it masked, no roster, a round
    already masked, a request that is not for this session or round, or parameters the codec cannot
    honour.
    """
    record = msg.content.config_records.get(RECORD_NAME)
    if record is None:
        if settings.distributed_dp:  # its noise share alone is far below the run's noise
            raise SecAggRefusal(DDP_NEEDS_SECAGG)
        if department.policy.require_secure_aggregation:
            raise SecAggRefusal(REQUIRED + "; the run asked for a plain update")
        # A round it masked stays masked: never a plain update of it beside the masked one.
        if department.policy.peers and server_round in load(department, store_for(department, run_id),
                                                             roster(department))[0].masked_rounds:
            raise SecAggRefusal(f"secure aggregation: round {server_round} of this run was masked by this "
                                "department; it sends no plain update of a masked round")
        return None
    peers = roster(department)
    request = records.from_record(record, MaskRequest)
    if request.run_key != run_id:
        raise SecAggRefusal("secure aggregation: the mask request belongs to another run than the train request")
    if request.round != server_round:
        raise SecAggRefusal(f"secure aggregation: the mask request is for round {request.round}, the train "
                            f"request for round {server_round}")
    store = store_for(department, run_id)
    stored, session = load(department, store, peers)
    if server_round in stored.masked_rounds:
        raise SecAggRefusal(f"secure aggregation: round {server_round} of this run was already masked by this "
                            "department; it masks each round of a run at most once, ever")
    if session is None:
        raise SecAggRefusal("secure aggregation: no session for this run here; the AdvertiseRequest comes first")
    params = session.params
    arrays = msg.content[ARRAYS_KEY]
    not_float = sorted(k for k, a in arrays.items() if not np.issubdtype(np.dtype(a.dtype), np.floating))
    if not_float:
        raise SecAggRefusal(f"secure aggregation: the model's arrays {not_float[:5]} are not floating point")
    layout = {k: tuple(a.shape) for k, a in arrays.items()}
    if settings.distributed_dp and settings.central_dp:
        raise SecAggRefusal("secure aggregation: a run asks for distributed DP at one level, record (distributed-dp) "
                            "or client (central-dp), not both")
    try:
        codec = (distributed_plan(settings, layout, params, department) if settings.distributed_dp or settings.central_dp
                 else codec_for(settings, layout, len(params.participants)))
    except ValueError as err:
        raise SecAggRefusal(f"secure aggregation: {err}") from None
    if settings.central_dp:  # client level: every department counts once, whatever its size
        weight = 1
    if weight > codec.max_weight:
        raise SecAggRefusal(f"secure aggregation: this department's size {weight} is above secagg-max-weight "
                            f"{codec.max_weight}")
    if codec.vector_length != params.vector_length or codec.modulus_bits > params.modulus_bits:
        raise SecAggRefusal(f"secure aggregation: this model and the run's settings need {codec.vector_length} "
                            f"coordinates in {codec.modulus_bits} bits; the session has {params.vector_length} in "
                            f"{params.modulus_bits} bits")
    # A dry run on a throwaway copy: a tampered, replayed or substituted request fails here, before training.
    session.mask(request, np.zeros(params.vector_length, dtype=np.uint64))
    return MaskPlan(request, store, stored, codec, weight)


def masked_reply(msg: Message, plan: MaskPlan, department: Department, trained, metrics) -> Message:
    """After training: mask Δ = trained − global (client-level distributed DP: clipped and noised first; record
    level: the noisy integer sum ``trained``), save, and reply without the weights."""
    peers = roster(department)
    session = DepartmentSession.from_state(plan.stored.session, department.signer, peers, session_policy(department))
    if isinstance(trained, np.ndarray):  # record-level distributed DP: the noisy integer sum
        x, clipped = plan.codec.encode(trained, plan.weight), 0
    else:
        global_arrays = msg.content[ARRAYS_KEY]
        delta = {key: np.asarray(trained[key], dtype=np.float64) - global_arrays[key].numpy().astype(np.float64)
                 for key in global_arrays}
        if isinstance(plan.codec, DistributedDpPlan):  # client-level distributed DP: Δ clipped and noised here
            from fedsilo.shared.distributed_dp import rotation_seed

            from .distributed_dp import noisy_client_update

            noisy = noisy_client_update(delta, plan.codec, rotation_seed(plan.request.run_key, plan.request.round))
            x, clipped = plan.codec.encode(noisy, 1), 0
        else:
            x, clipped = plan.codec.encode(delta, plan.weight)
    answer = session.mask(plan.request, x)
    # Saved before the reply (and the ledger charge): a crash now releases nothing, and the round is
    # declined when asked again, never masked twice.
    plan.store.save(StoredRun(session.to_state(), plan.stored.masked_rounds | {plan.request.round}))
    if clipped:  # on this host only: how far Δ exceeds the bound is about the records
        log.info("[%s] round %d: %d coordinates of the update clipped to ±%g", department.name,
                 plan.request.round, clipped, plan.codec.bound)
    status = ConfigRecord({"name": department.name, "status": STATUS_TRAINED, "reason": ""})
    return Message(RecordDict({METRICS_KEY: metrics, STATUS_KEY: status, RECORD_NAME: records.to_record(answer)}),
                   reply_to=msg)
