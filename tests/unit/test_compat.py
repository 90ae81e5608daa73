"""The AWS sample proxy's HSM AAD, and the compatibility-mode routing (docs/migration.md).

The reference construction below is written from the sample's Rust source
(xks-axum/src/xks_proxy/handlers/mod.rs, ``aad_and_digest`` and ``build_full_aad``),
independently of :func:`sample_hsm_aad`. The pinned digests and tags were computed
once with that reference and ``cryptography``'s AESGCM, so a change to either side
shows up here.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from xks_proxy.protocol.aad import hsm_aad
from xks_proxy.protocol.compat import (
    MARKER_FAMILY,
    MARKER_V1,
    MAX_OPERATOR_METADATA_BYTES,
    Construction,
    compat_ciphertext_metadata,
    construction_aad,
    decrypt_constructions,
    is_marked,
    legacy_metadata_problem,
    operator_metadata_problem,
    sample_hsm_aad,
)

KEY = bytes(range(32))
IV = bytes.fromhex(
    "cafebabefacedbaddecaf888"
)  # 12 bytes, as the sample draws with C_GenerateRandom
PLAINTEXT = b"XKS sample proxy migration test plaintext"
SAMPLE_METADATA = b"v0.0.1"  # base64 "djAuMC4x", the sample's commented-out example

AADS: dict[str, bytes | None] = {
    "absent": None,
    "empty": b"",
    "one": b"\x5a",
    "big": bytes(i * 7 % 251 for i in range(8192)),  # the spec's minimum AAD size
}
METADATA: dict[str, bytes | None] = {"none": None, "v001": SAMPLE_METADATA}

# (aad, metadata, SHA-256 of the sample's HSM AAD, GCM tag with KEY/IV/PLAINTEXT)
VECTORS = [
    (
        "absent",
        "none",
        "709e80c88487a2411e1ee4dfb9f22a861492d20c4765150c0c794abd70f8147c",
        "82d0f7c1e467584ea1ce9965c9588b90",
    ),
    (
        "absent",
        "v001",
        "04e05f4c5feeb8d73f6eead7cf4f15c7a0c247603e8d53e05debe3b35b37a9a6",
        "047e96e3ddaa462aec69cec21d6899c2",
    ),
    (
        "empty",
        "none",
        "d0e4fffd9ea24f1576f09b7fdf51d2ebcdad241e9bb054f89d9052fd3668bc16",
        "d75f3b8e304a2b16ff00ad8e4b59991e",
    ),
    (
        "empty",
        "v001",
        "dcf189fa45a13d6396187da7842cbd29745b9aec94be28b7b36cabf543f96b32",
        "51f15aac09873572b2a7fa299f698b4c",
    ),
    (
        "one",
        "none",
        "5030b88771d4ab4134799e583bf42cb6639d8afde58cbe9395c3e159121708d3",
        "d42bb110489b82cfb70e06261b1b32c4",
    ),
    (
        "one",
        "v001",
        "54001a651723f608d37cc4dd9b0e9324a8163257627850b1b5005085f99adee0",
        "5285d03271569cabfaa95181cf2b2096",
    ),
    (
        "big",
        "none",
        "e681a410c7969a0f48685da4c4f7b6fbcc6235435cc346df22b8e786ffb3a057",
        "f3eafeeecaf24f20dc919d35b982809a",
    ),
    (
        "big",
        "v001",
        "433a3e0c0a83dfea105d25bad5c3d16a542be36843fc07a4eaff48b501a6d115",
        "75449fccf33f51449136ca926db292c8",
    ),
]
CIPHERTEXT = bytes.fromhex(
    "d2e8f306d91b226b2a6e7dad0972f1462d4da936ad781e1d21b12405dbfa11dfdd3ca02fafa02c1a52"
)


def reference_sample_aad(aad: bytes | None, metadata: bytes | None) -> bytes:
    """The sample's build_full_aad, transcribed from its Rust source.

    aad_and_digest: AAD field absent -> aad_len 0 and no digest; present (even empty)
    -> aad_len = len, digest = SHA-256(AAD). build_full_aad: aad_len.to_be_bytes()
    (u16), then the digest if any, then the metadata length as one byte (always), then
    the metadata (decrypt: the request's, absent = empty; encrypt: the configured one).
    """
    out = bytearray(struct.pack(">H", 0 if aad is None else len(aad)))
    if aad is not None:
        out += hashlib.sha256(aad).digest()
    md = metadata if metadata is not None else b""
    out += struct.pack(">B", len(md))
    out += md
    return bytes(out)


# ----------------------------------------------------------------- the sample's construction


@pytest.mark.parametrize(("aad_name", "md_name", "aad_sha256", "tag"), VECTORS)
def test_sample_vectors(aad_name: str, md_name: str, aad_sha256: str, tag: str) -> None:
    aad, metadata = AADS[aad_name], METADATA[md_name]
    built = sample_hsm_aad(aad, metadata)
    assert built == reference_sample_aad(aad, metadata)
    assert hashlib.sha256(built).hexdigest() == aad_sha256
    sealed = AESGCM(KEY).encrypt(IV, PLAINTEXT, built)
    assert sealed == CIPHERTEXT + bytes.fromhex(tag)  # GCM: ciphertext || 16-byte tag
    # What the service does on a compat-mode decrypt of such a (legacy) ciphertext:
    [construction] = decrypt_constructions(metadata)
    assert construction is Construction.AWS_SAMPLE
    hsm_input = construction_aad(construction, aad, metadata)
    assert AESGCM(KEY).decrypt(IV, sealed, hsm_input) == PLAINTEXT


def test_explicit_layout_one_byte_aad_with_metadata() -> None:
    expected = bytes.fromhex(
        "0001"  # u16be length of the AAD
        "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"  # SHA-256("a")
        "06"  # u8 length of the metadata
        "76302e302e31"  # "v0.0.1"
    )
    assert sample_hsm_aad(b"a", SAMPLE_METADATA) == expected


def test_absent_and_empty_aad_differ_but_absent_and_empty_metadata_do_not() -> None:
    assert sample_hsm_aad(None, None) == b"\x00\x00\x00"
    assert sample_hsm_aad(b"", None) == b"\x00\x00" + hashlib.sha256(b"").digest() + b"\x00"
    assert sample_hsm_aad(b"x", b"") == sample_hsm_aad(b"x", None)


@pytest.mark.parametrize("aad_name", ["empty", "one", "big"])
def test_spec_construction_cannot_open_sample_ciphertexts_with_present_aad(aad_name: str) -> None:
    aad = AADS[aad_name]
    sealed = AESGCM(KEY).encrypt(IV, PLAINTEXT, sample_hsm_aad(aad, SAMPLE_METADATA))
    with pytest.raises(InvalidTag):
        AESGCM(KEY).decrypt(IV, sealed, hsm_aad(aad, SAMPLE_METADATA))


def test_constructions_coincide_when_the_aad_is_absent() -> None:
    """No digest without an AAD field: both are u16(0) || u8(len md) || md."""
    assert sample_hsm_aad(None, SAMPLE_METADATA) == hsm_aad(None, SAMPLE_METADATA)
    assert sample_hsm_aad(None, None) == hsm_aad(b"", None)


def test_limits() -> None:
    assert len(sample_hsm_aad(b"a" * 65535, b"m" * 20)) == 2 + 32 + 1 + 20
    with pytest.raises(ValueError):
        sample_hsm_aad(b"a" * 65536, None)  # the sample would panic (u16 try_into)
    with pytest.raises(ValueError):
        sample_hsm_aad(None, b"m" * 21)


@given(st.binary(min_size=0, max_size=600), st.one_of(st.none(), st.binary(max_size=20)))
def test_sample_matches_reference(aad: bytes, metadata: bytes | None) -> None:
    assert sample_hsm_aad(aad, metadata) == reference_sample_aad(aad, metadata)


@given(st.binary(max_size=600), st.one_of(st.none(), st.binary(max_size=20)))
def test_spec_and_sample_never_coincide_for_present_aad(aad: bytes, metadata: bytes | None) -> None:
    assert hsm_aad(aad, metadata) != sample_hsm_aad(aad, metadata)


@given(st.binary(min_size=32, max_size=32), st.one_of(st.none(), st.binary(max_size=20)))
def test_never_coincide_even_at_digest_length(aad: bytes, metadata: bytes | None) -> None:
    """At 32 bytes both have the same length; they still differ (AAD != SHA-256(AAD))."""
    spec, sample = hsm_aad(aad, metadata), sample_hsm_aad(aad, metadata)
    assert len(spec) == len(sample) and spec != sample


# ----------------------------------------------------------------- the marker


def test_marker_format() -> None:
    assert MARKER_V1 == b"~XK1" and MARKER_V1.startswith(MARKER_FAMILY)
    assert MAX_OPERATOR_METADATA_BYTES == 16
    assert compat_ciphertext_metadata(None) == b"~XK1"
    assert compat_ciphertext_metadata(b"") == b"~XK1"
    assert compat_ciphertext_metadata(b"v0.0.1") == b"~XK1v0.0.1"
    assert len(compat_ciphertext_metadata(b"k" * 16)) == 20


@pytest.mark.parametrize("bad", [b"k" * 17, b"tab\there", b"\x00", "é".encode()])
def test_operator_metadata_must_fit_and_be_printable(bad: bytes) -> None:
    assert operator_metadata_problem(bad) is not None
    with pytest.raises(ValueError):
        compat_ciphertext_metadata(bad)


def test_legacy_metadata_problems() -> None:
    assert legacy_metadata_problem(None) is None
    assert legacy_metadata_problem(SAMPLE_METADATA) is None
    assert legacy_metadata_problem(b"\xff\x00binary ok") is None
    assert legacy_metadata_problem(b"a~XKb") is not None
    assert legacy_metadata_problem(b"x" * 21) is not None


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (None, [Construction.AWS_SAMPLE]),
        (b"", [Construction.AWS_SAMPLE]),
        (SAMPLE_METADATA, [Construction.AWS_SAMPLE]),
        (b"\x00\xff\x10", [Construction.AWS_SAMPLE]),
        (b"~XK", []),  # family without a version
        (b"~XK2", []),  # unknown future version: never guess
        (b"~XK1", [Construction.SPEC]),
        (b"~XK1v0.0.1", [Construction.SPEC]),
        (b"~XK1\x00", []),  # marked but not printable
        (b"~XK1" + b"k" * 17, []),  # longer than 20 bytes
        (b"ab~XK1", []),  # a marker moved inside
        (b"ab\x04~XK1", []),
        (b"x" * 21, []),
    ],
)
def test_decrypt_constructions(metadata: bytes | None, expected: list[Construction]) -> None:
    assert decrypt_constructions(metadata) == expected
    assert len(decrypt_constructions(metadata)) <= 1  # never two tries


def test_compat_round_trip_and_tampering() -> None:
    """Encrypt as a compat-mode key store would; every moved byte fails or is refused."""
    aad = b"encryption context digest"
    metadata = compat_ciphertext_metadata(b"v2")
    sealed = AESGCM(KEY).encrypt(IV, PLAINTEXT, hsm_aad(aad, metadata))
    assert is_marked(metadata)
    [construction] = decrypt_constructions(metadata)
    assert construction is Construction.SPEC
    assert AESGCM(KEY).decrypt(IV, sealed, construction_aad(construction, aad, metadata)) == (
        PLAINTEXT
    )
    tampered: list[tuple[bytes | None, bytes | None]] = [
        (aad, None),  # marker stripped: routed to the sample construction
        (aad, b"v2"),
        (aad + metadata, None),  # metadata moved into the AAD
        (None, metadata),
        (aad[:-1], aad[-1:] + metadata),
        (aad, b"~XK1v3"),
    ]
    for tampered_aad, tampered_metadata in tampered:
        for candidate in decrypt_constructions(tampered_metadata):
            with pytest.raises(InvalidTag):
                AESGCM(KEY).decrypt(
                    IV, sealed, construction_aad(candidate, tampered_aad, tampered_metadata)
                )


def test_the_collision_the_contains_rule_blocks() -> None:
    """Why "~XK anywhere" is refused, not only a "~XK" prefix.

    An attacker who chooses the AAD at Encrypt can make a spec-construction input equal
    to a sample-construction input: AAD1 = SHA-256(AAD2) || t with t chosen so that
    t || u8(4) || "~XK1" == u8(12) || d. Then d contains the marker, so it is refused.
    """
    aad2 = b"x" * 40
    d = b"ABCDEFG" + b"\x04" + MARKER_V1
    aad1 = hashlib.sha256(aad2).digest() + bytes([len(d)]) + b"ABCDEFG"
    assert hsm_aad(aad1, MARKER_V1) == sample_hsm_aad(aad2, d)  # the bytes really collide
    assert decrypt_constructions(MARKER_V1) == [Construction.SPEC]
    assert decrypt_constructions(d) == []  # ... but this decrypt never reaches the HSM


# Property: no HSM input reachable on the spec route equals one on the sample route.

_printable = st.binary(max_size=MAX_OPERATOR_METADATA_BYTES).map(
    lambda raw: bytes(0x20 + b % 95 for b in raw)
)
_marked = _printable.map(lambda operator: MARKER_V1 + operator)
_optional_aad = st.one_of(st.none(), st.binary(max_size=80))


@st.composite
def _adversarial_pair(draw: st.DrawFn) -> tuple[bytes | None, bytes, bytes | None, bytes]:
    """Spec inputs (aad1, marked M) and sample inputs (aad2, d), often built to collide."""
    marked = draw(_marked)
    shape = draw(st.sampled_from(["free", "suffix", "wrapped"]))
    if shape == "suffix":  # d is a tail of M (the j < k case)
        d = marked[draw(st.integers(0, len(marked))) :]
    elif shape == "wrapped":  # d ends with u8(k) || M (the j > k case)
        d = (draw(st.binary(max_size=8)) + bytes([len(marked)]) + marked)[-20:]
    else:
        d = draw(st.binary(max_size=20))
    # Lined up: AAD1 = SHA-256(AAD2) || u8(len d) || the bytes of d before u8(k) || M,
    # with AAD2 as long as AAD1, so that both inputs have the same length prefix.
    lined_up_length = 32 + max(0, len(d) - len(marked))
    aad2 = draw(
        st.one_of(_optional_aad, st.binary(min_size=lined_up_length, max_size=lined_up_length))
    )
    head = b"" if aad2 is None else hashlib.sha256(aad2).digest()
    lined_up = head + bytes([len(d)]) + d[: max(0, len(d) - len(marked) - 1)]
    aad1 = draw(
        st.one_of(
            _optional_aad,
            st.binary(max_size=24).map(lambda tail: head + tail),  # digest-prefixed AAD
            st.integers(0, 32).map(lambda cut: head[:cut]),
            st.just(lined_up),
        )
    )
    return aad1, marked, aad2, d


@given(_adversarial_pair())
def test_routes_are_disjoint(pair: tuple[bytes | None, bytes, bytes | None, bytes]) -> None:
    aad1, marked, aad2, d = pair
    assert decrypt_constructions(marked) == [Construction.SPEC]
    if decrypt_constructions(d) != [Construction.AWS_SAMPLE]:
        return  # refused before the HSM
    assert hsm_aad(aad1, marked) != sample_hsm_aad(aad2, d)


@given(st.binary(max_size=20))
def test_any_metadata_gets_at_most_one_construction(metadata: bytes) -> None:
    routes = decrypt_constructions(metadata)
    assert len(routes) <= 1
    if routes == [Construction.SPEC]:
        assert metadata.startswith(MARKER_V1)
    if routes == [Construction.AWS_SAMPLE]:
        assert MARKER_FAMILY not in metadata
