"""SASL mechanisms against the published RFC vectors, byte for byte, and their failure modes."""

from __future__ import annotations

import base64

import pytest

from proxy.xmpp.sasl import (
    PREFERENCE,
    ClientMechanism,
    SaslError,
    choose_mechanism,
    client_mechanism,
    parse_plain,
    saslprep,
)

# RFC 5802 §5
SHA1_NONCE = "fyko+d2lbbFgONRv9qkxdawL"
SHA1_FIRST = b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
SHA1_SERVER_FIRST = b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
SHA1_FINAL = (
    b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
)
SHA1_SERVER_FINAL = b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="

# RFC 7677 §3
SHA256_NONCE = "rOprNGfwEbeRWgbNEkqO"
SHA256_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
SHA256_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
SHA256_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SHA256_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

# RFC 2831 §4
DIGEST_CHALLENGE = (
    b'realm="elwood.innosoft.com",nonce="OA6MG9tEQGm2hh",qop="auth",'
    b"algorithm=md5-sess,charset=utf-8"
)
DIGEST_RESPONSE = (
    b'charset=utf-8,username="chris",realm="elwood.innosoft.com",nonce="OA6MG9tEQGm2hh",'
    b'nc=00000001,cnonce="OA6MHXh6VqTrRk",digest-uri="imap/elwood.innosoft.com",'
    b"response=d388dad90d4bbd760a152321f2143af7,qop=auth"
)
DIGEST_RSPAUTH = b"rspauth=ea40f60335c427b5527b84dbabcdfffd"


def scram(name: str = "SCRAM-SHA-1", nonce: str = SHA1_NONCE, user: str = "user",
          password: str = "pencil") -> ClientMechanism:
    return client_mechanism(name, user, password, domain="example.org", nonce=lambda: nonce)


def digest(challenge: bytes | None = None) -> ClientMechanism:
    """The RFC 2831 §4 example client, optionally past its first challenge."""
    mech = client_mechanism("DIGEST-MD5", "chris", "secret", domain="elwood.innosoft.com",
                            service="imap", nonce=lambda: "OA6MHXh6VqTrRk")
    if challenge is not None:
        mech.respond(challenge)
    return mech


# --- SCRAM vectors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "nonce", "first", "server_first", "final", "server_final"),
    [
        ("SCRAM-SHA-1", SHA1_NONCE, SHA1_FIRST, SHA1_SERVER_FIRST, SHA1_FINAL, SHA1_SERVER_FINAL),
        ("SCRAM-SHA-256", SHA256_NONCE, SHA256_FIRST, SHA256_SERVER_FIRST, SHA256_FINAL,
         SHA256_SERVER_FINAL),
    ],
)
@pytest.mark.parametrize("final_in", ["success", "challenge"])
def test_scram_rfc_vectors(name: str, nonce: str, first: bytes, server_first: bytes,
                           final: bytes, server_final: bytes, final_in: str) -> None:
    mech = scram(name, nonce)
    assert mech.name == name
    assert mech.initial_response() == first
    assert mech.respond(server_first) == final
    if final_in == "success":
        mech.verify_success(server_final)
    else:
        assert mech.respond(server_final) == b""
        mech.verify_success(None)


def test_scram_username_escaping_and_default_nonce() -> None:
    mech = client_mechanism("SCRAM-SHA-1", "a=b,c", "pw", domain="example.org")
    first = mech.initial_response()
    assert first is not None and first.startswith(b"n,,n=a=3Db=2Cc,r=")
    client_nonce = first.split(b",r=")[1]
    assert len(client_nonce) >= 24 and b"," not in client_nonce


def test_scram_applies_saslprep_to_password() -> None:
    # U+00AD (soft hyphen) maps to nothing, so this is the RFC vector again.
    mech = scram(password="pen\u00adcil")
    mech.initial_response()
    assert mech.respond(SHA1_SERVER_FIRST) == SHA1_FINAL


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=someone-elses-nonce,s=QSXCR+Q6sek8bf92,i=4096",  # does not extend our nonce
        b"r=fyko+d2lbbFgONRv9qkxdawL,s=QSXCR+Q6sek8bf92,i=4096",  # adds nothing
        b"r=fyko+d2lbbFgONRv9qkxdawLx,s=not*base64,i=4096",
        b"r=fyko+d2lbbFgONRv9qkxdawLx,s=,i=4096",
        b"r=fyko+d2lbbFgONRv9qkxdawLx,s=QSXCR+Q6sek8bf92,i=0",
        b"r=fyko+d2lbbFgONRv9qkxdawLx,s=QSXCR+Q6sek8bf92,i=1000001",
        b"r=fyko+d2lbbFgONRv9qkxdawLx,s=QSXCR+Q6sek8bf92,i=+4096",
        b"r=fyko+d2lbbFgONRv9qkxdawLx,s=QSXCR+Q6sek8bf92",  # no iteration count
        b"s=QSXCR+Q6sek8bf92,r=fyko+d2lbbFgONRv9qkxdawLx,i=4096",  # wrong order
        b"m=ext,r=fyko+d2lbbFgONRv9qkxdawLx,s=QSXCR+Q6sek8bf92,i=4096",  # mandatory extension
        b"e=other-error",
        b"garbage",
        b"",
        b"r=fyko+d2lbbFgONRv9qkxdawL\xff,s=QSXCR+Q6sek8bf92,i=4096",  # not UTF-8
    ],
)
def test_scram_rejects_bad_server_first(server_first: bytes) -> None:
    mech = scram()
    mech.initial_response()
    with pytest.raises(SaslError):
        mech.respond(server_first)


WRONG_V = b"v=" + base64.b64encode(b"\0" * 20)


@pytest.mark.parametrize("server_final", [WRONG_V, b"e=invalid-proof", b"v=***", b"x=1"])
def test_scram_rejects_bad_server_final_in_success(server_final: bytes) -> None:
    mech = scram()
    mech.initial_response()
    mech.respond(SHA1_SERVER_FIRST)
    with pytest.raises(SaslError):
        mech.verify_success(server_final)


@pytest.mark.parametrize("server_final", [WRONG_V, b"e=invalid-proof"])
def test_scram_rejects_bad_server_final_in_challenge(server_final: bytes) -> None:
    mech = scram()
    mech.initial_response()
    mech.respond(SHA1_SERVER_FIRST)
    with pytest.raises(SaslError):
        mech.respond(server_final)


def test_scram_server_error_message_is_reported() -> None:
    mech = scram()
    mech.initial_response()
    mech.respond(SHA1_SERVER_FIRST)
    with pytest.raises(SaslError, match="invalid-proof"):
        mech.verify_success(b"e=invalid-proof")


@pytest.mark.parametrize("data", [None, b""])
def test_scram_success_without_server_signature_is_rejected(data: bytes | None) -> None:
    mech = scram()
    mech.initial_response()
    mech.respond(SHA1_SERVER_FIRST)
    with pytest.raises(SaslError):
        mech.verify_success(data)


def test_scram_success_before_proof_is_rejected() -> None:
    mech = scram()
    mech.initial_response()
    with pytest.raises(SaslError):
        mech.verify_success(SHA1_SERVER_FINAL)


def test_scram_challenge_after_server_final_is_rejected() -> None:
    mech = scram()
    mech.initial_response()
    mech.respond(SHA1_SERVER_FIRST)
    mech.respond(SHA1_SERVER_FINAL)
    with pytest.raises(SaslError):
        mech.respond(SHA1_SERVER_FINAL)


@pytest.mark.parametrize("nonce", ["", "a,b", "caf\u00e9", "a b"])
def test_bad_nonce_factory_is_a_local_error(nonce: str) -> None:
    with pytest.raises(ValueError):
        scram(nonce=nonce)


def test_scram_rejects_prohibited_credentials_locally() -> None:
    with pytest.raises(ValueError):
        scram(password="bell\u0007")


# --- DIGEST-MD5 -----------------------------------------------------------------------------


def test_digest_md5_rfc2831_vector_rspauth_as_challenge() -> None:
    mech = digest()
    assert mech.name == "DIGEST-MD5"
    assert mech.initial_response() is None
    assert mech.respond(DIGEST_CHALLENGE) == DIGEST_RESPONSE
    assert mech.respond(DIGEST_RSPAUTH) == b""
    mech.verify_success(None)


def test_digest_md5_rspauth_in_success() -> None:
    mech = digest(DIGEST_CHALLENGE)
    mech.verify_success(DIGEST_RSPAUTH)


def test_digest_md5_tolerates_whitespace_and_empty_elements() -> None:
    challenge = (
        b' realm = "elwood.innosoft.com" ,, nonce="OA6MG9tEQGm2hh",\tqop="auth-int, auth",'
        b"algorithm=md5-sess , charset=utf-8,"
    )
    assert digest().respond(challenge) == DIGEST_RESPONSE


def test_digest_md5_default_realm_escapes_and_xmpp_uri() -> None:
    mech = client_mechanism("DIGEST-MD5", 'a"b', "pw", domain="example.org",
                            nonce=lambda: "cn")
    response = mech.respond(b'nonce="n\\"x",qop="auth",algorithm=md5-sess,charset=utf-8')
    assert b'username="a\\"b"' in response
    assert b'realm="example.org"' in response
    assert b'nonce="n\\"x"' in response
    assert b'digest-uri="xmpp/example.org"' in response


def test_digest_md5_prefers_realm_matching_domain() -> None:
    mech = digest()
    response = mech.respond(
        b'realm="other",realm="elwood.innosoft.com",nonce="OA6MG9tEQGm2hh",qop="auth",'
        b"algorithm=md5-sess,charset=utf-8"
    )
    assert response == DIGEST_RESPONSE


def test_digest_md5_without_charset_uses_latin1() -> None:
    mech = client_mechanism("DIGEST-MD5", "j\u00fcrgen", "pw", domain="example.org",
                            nonce=lambda: "cn")
    response = mech.respond(b'nonce="abc",qop="auth",algorithm=md5-sess')
    assert b"charset" not in response
    assert b'username="j\xfcrgen"' in response
    with pytest.raises(SaslError):  # not representable in ISO-8859-1
        client_mechanism("DIGEST-MD5", "\u0416", "pw", domain="example.org").respond(
            b'nonce="abc",qop="auth",algorithm=md5-sess'
        )


def test_digest_md5_wrong_rspauth() -> None:
    with pytest.raises(SaslError):
        digest(DIGEST_CHALLENGE).respond(b"rspauth=00000000000000000000000000000000")
    with pytest.raises(SaslError):
        digest(DIGEST_CHALLENGE).verify_success(b"rspauth=00000000000000000000000000000000")


@pytest.mark.parametrize("data", [None, b"", b'realm="x"'])
def test_digest_md5_success_without_rspauth_is_rejected(data: bytes | None) -> None:
    with pytest.raises(SaslError):
        digest(DIGEST_CHALLENGE).verify_success(data)


@pytest.mark.parametrize(
    "challenge",
    [
        b'realm="r",nonce="n",qop="auth-int,auth-conf",algorithm=md5-sess',  # no qop=auth
        b'realm="r",qop="auth",algorithm=md5-sess',  # no nonce
        b'nonce="a",nonce="b",qop="auth",algorithm=md5-sess',  # repeated nonce
        b'nonce="n",qop="auth",algorithm=md5',  # not md5-sess
        b'nonce="unterminated,qop="auth"',
        b"nonce=n qop=auth",
        b'realm="\xff",nonce="n",qop="auth",algorithm=md5-sess,charset=utf-8',  # bad UTF-8
    ],
)
def test_digest_md5_rejects_bad_challenge(challenge: bytes) -> None:
    with pytest.raises(SaslError):
        digest().respond(challenge)


def test_digest_md5_missing_qop_defaults_to_auth() -> None:
    # RFC 2831 §2.1.1: an absent qop-options directive means "auth".
    response = digest().respond(b'nonce="OA6MG9tEQGm2hh",algorithm=md5-sess')
    assert response.endswith(b",qop=auth")


# --- PLAIN ----------------------------------------------------------------------------------


def test_plain_initial_response() -> None:
    mech = client_mechanism("PLAIN", "juliet", "r0m30myr0m30", domain="example.org")
    # RFC 6120 §6.4.2 example: AGp1bGlldAByMG0zMG15cjBtMzA=
    assert base64.b64encode(mech.initial_response() or b"") == b"AGp1bGlldAByMG0zMG15cjBtMzA="
    mech.verify_success(None)
    with pytest.raises(SaslError):
        mech.respond(b"anything")


def test_plain_rejects_nul_in_credentials() -> None:
    with pytest.raises(ValueError):
        client_mechanism("PLAIN", "a\0b", "pw", domain="example.org")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"\0juliet\0r0m30myr0m30", ("", "juliet", "r0m30myr0m30")),
        (b"romeo@example.net\0juliet\0r0m30", ("romeo@example.net", "juliet", "r0m30")),
        ("\0j\u00fcrgen\0p\u00e4ss w\u00f6rd".encode(), ("", "j\u00fcrgen", "p\u00e4ss w\u00f6rd")),
        # Returned as sent (unprepared) so it can be relayed verbatim.
        ("\0user\0pen\u00adcil".encode(), ("", "user", "pen\u00adcil")),
    ],
)
def test_parse_plain_good(message: bytes, expected: tuple[str, str, str]) -> None:
    assert parse_plain(message) == expected


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"juliet\0secret",  # two fields
        b"\0juliet\0secret\0",  # four fields
        b"a\0b\0c\0d",
        b"\0\0secret",  # empty authcid
        b"\0juliet\0",  # empty password
        b"\0jul\xffiet\0secret",  # not UTF-8
        b"\xff\0juliet\0secret",  # authzid not UTF-8
        b"\0juliet\0sec\x07ret",  # control character
        "\0juliet\0sec\u200eret".encode(),  # LRM is prohibited (C.8)
        "\0\u0627\u0031\0secret".encode(),  # bidi rule
    ],
)
def test_parse_plain_malformed(message: bytes) -> None:
    with pytest.raises(SaslError):
        parse_plain(message)


# --- selection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        (["PLAIN", "DIGEST-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"], "SCRAM-SHA-256"),
        (["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-1-PLUS"], "SCRAM-SHA-1"),
        (["SCRAM-SHA-256-PLUS", "PLAIN", "DIGEST-MD5"], "DIGEST-MD5"),
        (["PLAIN", "ANONYMOUS", "EXTERNAL"], "PLAIN"),
        (["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "X-OAUTH2"], None),
        ([], None),
        (iter([" scram-sha-1 "]), "SCRAM-SHA-1"),
    ],
)
def test_choose_mechanism(offered: list[str], expected: str | None) -> None:
    assert choose_mechanism(offered) == expected


def test_every_preferred_mechanism_can_be_built() -> None:
    for name in PREFERENCE:
        assert client_mechanism(name, "u", "p", domain="example.org").name == name


@pytest.mark.parametrize("name", ["SCRAM-SHA-1-PLUS", "CRAM-MD5", "ANONYMOUS", ""])
def test_client_mechanism_unknown_name(name: str) -> None:
    with pytest.raises(ValueError):
        client_mechanism(name, "u", "p", domain="example.org")


@pytest.mark.parametrize("name", PREFERENCE)
def test_repr_hides_secrets(name: str) -> None:
    mech = client_mechanism(name, "someuser", "hunter2", domain="example.org",
                            nonce=lambda: "secretnonce")
    for text in (repr(mech), str(mech)):
        assert name in text
        for secret in ("someuser", "hunter2", "secretnonce"):
            assert secret not in text


# --- SASLprep (RFC 4013 §3 examples) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I\u00adX", "IX"),  # soft hyphen mapped to nothing
        ("user", "user"),
        ("USER", "USER"),  # case preserved
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC
        ("a\u00a0b", "a b"),  # non-ASCII space mapped to space
        ("\u0627\u0628", "\u0627\u0628"),  # pure right-to-left is fine
        ("\U0002f874", "\u5f33"),  # stringprep pins NFKC to Unicode 3.2 (later: U+5F53)
    ],
)
def test_saslprep(text: str, expected: str) -> None:
    assert saslprep(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "\u0007",  # prohibited (C.2.1)
        "\u0627\u0031",  # bidi: must end with a RandALCat character
        "\u0627a\u0628",  # bidi: mixes RandALCat and LCat
        "a\ue000",  # private use (C.3)
        "a\ufffdb",  # replacement character is inappropriate for plain text (C.6)
    ],
)
def test_saslprep_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        saslprep(text)


def test_saslprep_unassigned_code_points() -> None:
    assert saslprep("a\u0221") == "a\u0221"  # unassigned in Unicode 3.2: fine for queries
    with pytest.raises(ValueError):
        saslprep("a\u0221", allow_unassigned=False)
