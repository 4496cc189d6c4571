"""Secure aggregation's building blocks: fixed test vectors cross-checked against a recomputation
straight from `cryptography`, the canonical encoding, Z_{2^k}, and every message's byte form."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsilo.secagg import MalformedMessage, decode_signed, encode_signed, required_bits
from fedsilo.secagg import keys, masking, messages, sharing
from fedsilo.secagg.encoding import decode, encode
from fedsilo.secagg.session import SessionParams

# --- test vectors ---------------------------------------------------------------------------------

SK_ALICE, SK_BOB = bytes(range(1, 33)), bytes(range(33, 65))
PARAMS = SessionParams("run-vectors", bytes(range(16)), 2, ("alice", "bob"), 32, 4, 0, 1)
CONTEXT_HEX = (  # protocol version 2
    "4c0000000a530000001966656473696c6f2d7365636167672f636f6e746578742f7631490000000000000002530000000b"
    "72756e2d766563746f72734200000010000102030405060708090a0b0c0d0e0f4900000000000000024900000000000000"
    "204900000000000000044c000000025300000005616c6963655300000003626f62490000000000000000490000000000000001")
PAIR_KEY_HEX = "33444eb819a96faac03c37cfe30249fa271f4bfee3dcd1abfc5d8057c148a1b1"
PAIR_SEED_HEX = "96af2134f793cc9595638f01f43b3f98990f6d823b0282238cfe3138b114d555"
MASK_WORDS_32 = [0x2EF10BDB, 0x9262A65F, 0x11F00605, 0xA44DE65B]
MASK_WORDS_62 = [0x037F5FCF2EF10BDB, 0x20A7E6139262A65F]


# An encoder written again here, by hand, so that the vectors do not test the code against itself.
def _s(text: str) -> bytes:
    return b"S" + struct.pack(">I", len(text)) + text.encode()


def _b(data: bytes) -> bytes:
    return b"B" + struct.pack(">I", len(data)) + data


def _i(value: int) -> bytes:
    return b"I" + struct.pack(">Q", value)


def _l(*items: bytes) -> bytes:
    return b"L" + struct.pack(">I", len(items)) + b"".join(items)


def _raw_public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_context_vector_matches_a_hand_encoding():
    hand = _l(_s("fedsilo-secagg/context/v1"), _i(2), _s("run-vectors"), _b(bytes(range(16))), _i(2), _i(32),
              _i(4), _l(_s("alice"), _s("bob")), _i(0), _i(1))
    assert PARAMS.context == hand == bytes.fromhex(CONTEXT_HEX)


def test_pair_key_seed_and_mask_vectors_recomputed_from_the_primitives():
    alice, bob = X25519PrivateKey.from_private_bytes(SK_ALICE), X25519PrivateKey.from_private_bytes(SK_BOB)
    k_ab = keys.pair_key(alice, _raw_public(SK_BOB), PARAMS.session_id, PARAMS.context, "alice", "bob")
    k_ba = keys.pair_key(bob, _raw_public(SK_ALICE), PARAMS.session_id, PARAMS.context, "bob", "alice")
    assert k_ab == k_ba == bytes.fromhex(PAIR_KEY_HEX)

    # Independently: X25519, HKDF and ChaCha20 by hand.
    shared = alice.exchange(X25519PublicKey.from_public_bytes(_raw_public(SK_BOB)))
    info = _l(_s("fedsilo-secagg/pair-key/v1"), _b(PARAMS.context), _l(_s("alice"), _s("bob")))
    k_hand = HKDF(hashes.SHA256(), 32, salt=bytes(range(16)), info=info).derive(shared)
    assert k_hand == k_ab
    seed_info = _l(_s("fedsilo-secagg/pair-mask/v1"), _i(0), _b(PARAMS.context))
    seed_hand = HKDF(hashes.SHA256(), 32, salt=None, info=seed_info).derive(k_hand)
    assert seed_hand == keys.pair_seed(k_ab, 0, PARAMS.context) == bytes.fromhex(PAIR_SEED_HEX)
    stream = Cipher(algorithms.ChaCha20(seed_hand, bytes(16)), mode=None).encryptor().update(bytes(32))
    words = [int.from_bytes(stream[i:i + 8], "little") for i in range(0, 32, 8)]
    assert [w % 2**32 for w in words] == MASK_WORDS_32 == masking.prg(seed_hand, 4, 32).tolist()
    assert [w % 2**62 for w in words[:2]] == MASK_WORDS_62 == masking.prg(seed_hand, 2, 62).tolist()
    # Each round has its own seed; the pair key is never a mask key itself.
    assert keys.pair_seed(k_ab, 1, PARAMS.context) != seed_hand


def test_low_order_x25519_key_is_refused():
    with pytest.raises(ValueError):
        keys.pair_key(X25519PrivateKey.from_private_bytes(SK_ALICE), bytes(32), PARAMS.session_id,
                      PARAMS.context, "alice", "bob")


# --- canonical encoding ---------------------------------------------------------------------------

def test_encoding_vector_and_round_trip():
    data = encode("ab", b"\x01", 5, ["x", []])
    assert data.hex() == "4c00000004530000000261624200000001014900000000000000054c000000025300000001784c00000000"
    assert decode(data, 1000) == ["ab", b"\x01", 5, ["x", []]]


def test_encoding_separates_what_concatenation_would_not():
    assert encode("ab", "c") != encode("a", "bc")
    assert encode(b"1") != encode("1") != encode(1)
    assert encode(["a"], "b") != encode(["a", "b"])


@pytest.mark.parametrize("bad", [-1, 2**64, True, 1.5, None, {"a": 1}])
def test_encoding_refuses_values_without_one_form(bad):
    with pytest.raises((ValueError, TypeError)):
        encode(bad)


@pytest.mark.parametrize("data", [b"", b"L", b"L\x00\x00\x00\x01", b"X\x00", b"L\xff\xff\xff\xffI",
                                  b"L\x00\x00\x00\x01S\x00\x00\x00\x01\xff", encode(1) + b"\x00"])
def test_decoding_is_strict(data):
    with pytest.raises(MalformedMessage):
        decode(data, 1000)


def test_decoding_is_bounded():
    with pytest.raises(MalformedMessage, match="exceeds"):
        decode(encode(b"x" * 100), 50)


# --- Z_{2^k} --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 16, 32, 62])
def test_signed_round_trip_and_bounds(bits):
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    values = np.array([low, low + 1, -1, 0, 1, high - 1, high], dtype=np.int64)
    encoded = encode_signed(values, bits)
    assert encoded.dtype == np.uint64 and int(encoded.max()) < (1 << bits)
    assert decode_signed(encoded, bits).tolist() == values.tolist()
    for outside in (low - 1, high + 1):
        with pytest.raises(ValueError):
            encode_signed(np.array([outside]), bits)
    with pytest.raises(ValueError):
        decode_signed(np.array([1 << bits], dtype=np.uint64), bits)


def test_signed_sum_decodes_exactly_when_bits_are_required_bits():
    rng = np.random.default_rng(0)
    n, max_abs = 7, 1000
    bits = required_bits(max_abs, n)
    values = [rng.integers(-max_abs, max_abs + 1, 50) for _ in range(n)]
    values[0][:] = max_abs  # the extreme sum is representable too
    total = np.zeros(50, dtype=np.uint64)
    for v in values:
        total = masking.add(total, encode_signed(v, bits), bits)
    assert decode_signed(total, bits).tolist() == np.sum(values, axis=0).tolist()


def test_required_bits():
    assert required_bits(0, 1) == 8
    assert required_bits(127, 1) == 8 and required_bits(128, 1) == 9
    assert required_bits(2**20, 16) == 26          # 2^24 needs 25 bits of magnitude, plus the sign
    assert required_bits(2**61 - 1, 1) == 62
    with pytest.raises(ValueError):
        required_bits(2**61, 1)
    with pytest.raises(ValueError):
        encode_signed([1], 63)


def test_inputs_must_be_elements_of_the_ring():
    with pytest.raises(ValueError, match="uint64"):
        masking.check_element(np.zeros(3, dtype=np.int64), 3, 16)
    with pytest.raises(ValueError, match="shape"):
        masking.check_element(np.zeros(4, dtype=np.uint64), 3, 16)
    with pytest.raises(ValueError, match="2\\^16"):
        masking.check_element(np.array([0, 1 << 16, 0], dtype=np.uint64), 3, 16)


def test_k_bit_packing_vector_round_trip_and_refusals():
    """A masked vector travels in k-bit words: a hand-packed vector, exact round trips, and a strict reader."""
    # 3 elements of Z_{2^10}: 0x3FF, 0x001, 0x2AA -> bit stream 1111111111 1000000000 0101010101 (LSB first),
    # 30 bits in 4 bytes read LSB first: 0xFF, 0x07, 0xA0, 0x2A (the last two bits padding, zero).
    values = np.array([0x3FF, 0x001, 0x2AA], dtype=np.uint64)
    assert masking.to_bytes(values, 10) == bytes([0xFF, 0x07, 0xA0, 0x2A])
    assert masking.from_bytes(bytes([0xFF, 0x07, 0xA0, 0x2A]), 3, 10).tolist() == values.tolist()
    rng = np.random.default_rng(0)
    for bits, length in ((8, 1), (37, 16385), (62, 70001), (13, (1 << 15) + 3)):  # across chunk boundaries
        x = rng.integers(0, 1 << bits, size=length, dtype=np.uint64)
        packed = masking.to_bytes(x, bits)
        assert len(packed) == masking.packed_size(length, bits) == (length * bits + 7) // 8
        assert np.array_equal(masking.from_bytes(packed, length, bits), x)
    assert masking.packed_size(16385, 37) < 16385 * 8 * 0.6  # 37 of 64 bits
    with pytest.raises(ValueError, match="takes 4 bytes, not 5"):
        masking.from_bytes(bytes(5), 3, 10)
    with pytest.raises(ValueError, match="padding bits are not zero"):
        masking.from_bytes(bytes([0xFF, 0x07, 0xA0, 0x6A]), 3, 10)  # bit 30 set
    with pytest.raises(ValueError, match="entries of 2\\^10 or more"):
        masking.to_bytes(np.array([1 << 10], dtype=np.uint64), 10)


def test_shamir_detects_an_inconsistent_extra_share():
    seed = bytes(range(16))
    shares = sharing.split(seed, 3, 5)
    owners = {i: f"d{i}" for i in shares}
    assert sharing.combine({i: shares[i] for i in (2, 4, 5)}, 3, owners, "d1") == seed
    assert sharing.combine(shares, 3, owners, "d1") == seed
    shares[5] = bytes(16)
    with pytest.raises(ValueError, match="'d5' disagrees"):
        sharing.combine(shares, 3, owners, "d1")


# --- messages -------------------------------------------------------------------------------------

RUN, SID = "run-1", bytes(range(16))
ADV = messages.Advertisement(RUN, SID, "alice", bytes(range(32)), "c2lnbmF0dXJl")
EXAMPLES = [
    messages.AdvertiseRequest(RUN, SID, 3, ("alice", "bob", "carol"), 32, 10, 0, 4),
    ADV,
    messages.ShareRequest(RUN, SID, (ADV, messages.Advertisement(RUN, SID, "bob", bytes(32), "c2ln"))),
    messages.Shares(RUN, SID, "alice", {"bob": bytes(40), "carol": bytes(44)}),
    messages.MaskRequest(RUN, SID, 2, ("alice", "bob", "carol"), {"bob": bytes(40), "carol": bytes(40)}),
    messages.MaskedInput(RUN, SID, 2, "alice", bytes(80), "c2lnbmF0dXJl"),
    messages.ConsistencyRequest(RUN, SID, 2, ("alice", "bob", "carol")),
    messages.ConsistencySignature(RUN, SID, 2, "alice", "c2lnbmF0dXJl"),
    messages.UnmaskRequest(RUN, SID, 2, ("alice", "bob", "carol"), {"bob": "c2ln", "carol": "c2ln"},
                           {"alice": "c2ln", "bob": "c2ln"}),
    messages.Unmasking(RUN, SID, 2, "alice", {"alice": b"s" * 16, "bob": b"t" * 16}, {"carol": b"k" * 32}),
]


def test_every_message_type_has_an_example():
    assert {type(m) for m in EXAMPLES} == set(messages.MESSAGE_TYPES)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_message_round_trip_and_strictness(message):
    data = message.to_bytes()
    assert type(message).from_bytes(data) == message
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(MalformedMessage):
            type(message).from_bytes(data[:cut])
    with pytest.raises(MalformedMessage):
        type(message).from_bytes(data + b"\x00")
    for version in (messages.VERSION - 1, messages.VERSION + 1):  # an older peer (v1: 64-bit words) or a newer one
        with pytest.raises(MalformedMessage, match="version"):
            type(message).from_bytes(type(message)(**{**message.__dict__, "version": version}).to_bytes())
    other = next(cls for cls in messages.MESSAGE_TYPES if cls is not type(message))
    with pytest.raises(MalformedMessage):
        other.from_bytes(data)


def test_messages_refuse_non_canonical_or_oversized_fields():
    base = messages.ConsistencyRequest(RUN, SID, 2, ("alice", "bob"))
    for responders in (("bob", "alice"), ("alice", "alice"), ("a" * 65,), ("../x",), ("",)):
        with pytest.raises(MalformedMessage):
            messages.ConsistencyRequest.from_bytes(
                messages.ConsistencyRequest(RUN, SID, 2, responders).to_bytes())
    with pytest.raises(MalformedMessage, match="session id"):
        messages.ConsistencyRequest.from_bytes(messages.ConsistencyRequest(RUN, b"short", 2, ("a",)).to_bytes())
    with pytest.raises(MalformedMessage):
        messages.AdvertiseRequest.from_bytes(
            messages.AdvertiseRequest(RUN, SID, 3, ("a",), 32, messages.MAX_VECTOR_LENGTH + 1, 0, 1).to_bytes())
    with pytest.raises(MalformedMessage):
        messages.Unmasking.from_bytes(messages.Unmasking(RUN, SID, 2, "a", {"a": b"x" * 15}, {}).to_bytes())
    assert messages.ConsistencyRequest.from_bytes(base.to_bytes()) == base


def test_secrets_never_appear_in_repr():
    secret_share, secret_seed = b"S" * 16, b"K" * 32
    text = repr(messages.Unmasking(RUN, SID, 2, "alice", {"alice": secret_share}, {"bob": secret_seed}))
    assert "SSSS" not in text and "KKKK" not in text
    assert "SSSS" not in repr(messages.MaskedInput(RUN, SID, 2, "alice", secret_share, "c2ln"))
