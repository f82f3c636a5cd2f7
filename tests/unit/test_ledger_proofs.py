"""The independent verifier (services/audit/ledger_proofs.py) against RFC 6962 reference vectors and tampering."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import timestamp_pb2

from services.audit import ledger_proofs as lp
from voiceassist.audit.v1 import audit_pb2

# Certificate Transparency's reference leaves and the root of every tree size 0..8 (RFC 6962 test vectors, as
# published with the CT and transparency-dev/merkle implementations).
REFERENCE_LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                               "606162636465666768696a6b6c6d6e6f")]  # fmt: skip
REFERENCE_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
REFERENCE_INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]  # fmt: skip
REFERENCE_CONSISTENCY = [
    (2, 8, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]  # fmt: skip

LEAVES = [lp.leaf_hash(entry) for entry in REFERENCE_LEAVES]


def _root(size: int) -> bytes:
    return bytes.fromhex(REFERENCE_ROOTS[size])


def test_roots_match_rfc6962_reference_vectors() -> None:
    for size in range(len(REFERENCE_LEAVES) + 1):
        assert lp.root_of(LEAVES[:size]).hex() == REFERENCE_ROOTS[size], size


@pytest.mark.parametrize(("index", "size", "proof"), REFERENCE_INCLUSION)
def test_reference_inclusion_proofs_verify_and_mangled_ones_do_not(index: int, size: int, proof: list[str]) -> None:
    path = [bytes.fromhex(h) for h in proof]
    assert lp.verify_inclusion(LEAVES[index], index, size, path, _root(size))
    assert not lp.verify_inclusion(LEAVES[index], index + 1, size, path, _root(size))
    assert not lp.verify_inclusion(LEAVES[index], index, size + 1, path, _root(size))
    assert not lp.verify_inclusion(LEAVES[index + 1], index, size, path, _root(size))
    assert not lp.verify_inclusion(LEAVES[index], index, size, path[:-1], _root(size))
    assert not lp.verify_inclusion(LEAVES[index], index, size, [*path, bytes(32)], _root(size))
    flipped = [bytearray(h) for h in path]
    flipped[1][7] ^= 1
    assert not lp.verify_inclusion(LEAVES[index], index, size, [bytes(h) for h in flipped], _root(size))
    assert not lp.verify_inclusion(LEAVES[index], index, size, [h[:31] for h in path], _root(size))


@pytest.mark.parametrize(("old", "new", "proof"), REFERENCE_CONSISTENCY)
def test_reference_consistency_proofs_verify_and_mangled_ones_do_not(old: int, new: int, proof: list[str]) -> None:
    path = [bytes.fromhex(h) for h in proof]
    assert lp.verify_consistency(old, new, _root(old), _root(new), path)
    assert not lp.verify_consistency(old, new, _root(old - 1), _root(new), path)
    assert not lp.verify_consistency(old, new, _root(old), _root(new - 1), path)
    assert not lp.verify_consistency(old, new, _root(old), _root(new), path[:-1])
    assert not lp.verify_consistency(old, new, _root(old), _root(new), list(reversed(path)))
    assert not lp.verify_consistency(old, new, _root(old), _root(new), [])


def test_degenerate_consistency_cases() -> None:
    assert lp.verify_consistency(4, 4, _root(4), _root(4), [])
    assert not lp.verify_consistency(4, 4, _root(4), _root(5), [])
    assert not lp.verify_consistency(4, 4, _root(4), _root(4), [bytes(32)])
    assert lp.verify_consistency(0, 8, lp.EMPTY_ROOT, _root(8), [])
    assert not lp.verify_consistency(8, 6, _root(8), _root(6), [])


def _event() -> audit_pb2.Event:
    event = audit_pb2.Event(
        event_id="0b6f8f2e-8d4c-4a53-9a55-0d1c2b3a4f5e",
        sequence=7,
        action="auth.login.success",
        actor=audit_pb2.Actor(id="u-1", email="", role="user"),
        resource=audit_pb2.Resource(type="user", id="u-1"),
        outcome=audit_pb2.OUTCOME_SUCCESS,
        request_id="req-1",
        client_ip="10.0.0.1",
        user_agent='curl/8 "quoted" \u00e9\n',
        service="auth",
        method="/voiceassist.auth.v1.AuthService/Login",
        metadata={"b": "2", "a": "\u2028x"},
        event_time=timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_456_789),
        commit_time=timestamp_pb2.Timestamp(seconds=1_700_000_001, nanos=5_000),
    )
    return event


def test_canonical_encoding_is_jcs_of_the_documented_array() -> None:
    expected = (
        '[1,7,"0b6f8f2e-8d4c-4a53-9a55-0d1c2b3a4f5e",1700000000123456,1700000001000005,"u-1","","user",'
        '"auth.login.success","user","u-1",1,"","req-1","10.0.0.1","curl/8 \\"quoted\\" \u00e9\\n","auth",'
        '"/voiceassist.auth.v1.AuthService/Login","{\\"a\\":\\"\u2028x\\",\\"b\\":\\"2\\"}",""]'
    )
    assert lp.canonical_bytes(lp.event_values(_event())) == expected.encode()
    assert lp.event_leaf_hash(_event()) == hashlib.sha256(b"\x00" + expected.encode()).digest()


def test_any_changed_field_changes_the_leaf_hash() -> None:
    original = lp.event_leaf_hash(_event())
    for change in (
        lambda e: setattr(e, "action", "auth.login.failure"),
        lambda e: setattr(e, "sequence", 8),
        lambda e: setattr(e.actor, "id", "u-2"),
        lambda e: e.metadata.__setitem__("c", "3"),
        lambda e: setattr(e.event_time, "nanos", 123_457_000),
        lambda e: setattr(e, "appended_by", "admin-1"),
    ):
        event = _event()
        change(event)
        assert lp.event_leaf_hash(event) != original


def _signed(private: Ed25519PrivateKey, **overrides) -> dict:
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    fields = {"origin": "test-ledger", "tree_size": 8, "root_hash": _root(8), "timestamp_us": 1_700_000_000_000_000,
              "signer": lp.key_id(public)}  # fmt: skip
    signature = private.sign(lp.checkpoint_text(**fields))
    fields.update(overrides)
    return {**fields, "signature": signature, "public_key": public}


def test_checkpoint_signature_verifies_and_binds_every_field() -> None:
    key = Ed25519PrivateKey.generate()
    assert lp.verify_checkpoint(**_signed(key), expected_origin="test-ledger")
    assert not lp.verify_checkpoint(**_signed(key), expected_origin="another-ledger")
    assert not lp.verify_checkpoint(**_signed(key, tree_size=9))
    assert not lp.verify_checkpoint(**_signed(key, root_hash=_root(7)))
    assert not lp.verify_checkpoint(**_signed(key, timestamp_us=1))
    assert not lp.verify_checkpoint(**_signed(key, origin="other"))
    other = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    assert not lp.verify_checkpoint(**{**_signed(key), "public_key": other})
    assert not lp.verify_checkpoint(**{**_signed(key), "public_key": other, "signer": lp.key_id(other)})


def test_the_fast_encoder_agrees_with_the_standard_one() -> None:
    tricky = (1, "\x00\x1f\x7f\u2028\ud7ff\U0001f600", 'a"b\\c\n\r\t\b\f', 2**53, "", "é")
    assert lp.canonical_bytes(tricky) == lp._json((lp.CANONICAL_VERSION, *tricky)).encode()
