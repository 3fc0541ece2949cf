"""SASL as small socket-free state objects: raw bytes in and out (base64 is the caller's job).

Client side PLAIN (RFC 4616), SCRAM-SHA-1/-256 without channel binding (RFC 5802, RFC 7677) and
DIGEST-MD5 (RFC 2831, historic but still what legacy servers offer); server side only the
parsing of a PLAIN message. Nothing here logs, and repr() never shows credentials.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import stringprep
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

__all__ = [
    "PREFERENCE", "ClientMechanism", "DigestMD5Client", "PlainClient", "SaslError",
    "ScramClient", "choose_mechanism", "client_mechanism", "parse_plain", "saslprep",
]

PREFERENCE: tuple[str, ...] = ("SCRAM-SHA-256", "SCRAM-SHA-1", "DIGEST-MD5", "PLAIN")

# Beyond this a server is either misconfigured or trying to burn our CPU.
MAX_SCRAM_ITERATIONS = 1_000_000


class SaslError(Exception):
    """The peer broke the mechanism (bad nonce, bad server signature, malformed challenge)."""


_PROHIBITED = (
    stringprep.in_table_c12, stringprep.in_table_c21, stringprep.in_table_c22,
    stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
    stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9,
)


def saslprep(text: str, *, allow_unassigned: bool = True) -> str:
    """SASLprep (RFC 4013); ValueError on prohibited input. SCRAM inputs are "query" strings
    (RFC 5802 §2.2), hence unassigned code points are allowed by default."""
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch
                     for ch in text if not stringprep.in_table_b1(ch))
    # stringprep is defined against Unicode 3.2, so normalise with that version's tables.
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    for ch in prepared:
        if any(check(ch) for check in _PROHIBITED):
            raise ValueError(f"SASLprep: prohibited character U+{ord(ch):04X}")
        if not allow_unassigned and stringprep.in_table_a1(ch):
            raise ValueError(f"SASLprep: unassigned code point U+{ord(ch):04X}")
    # RFC 3454 §6 bidi rules: RandALCat text must not mix in LCat and must start and end RandAL.
    if any(stringprep.in_table_d1(ch) for ch in prepared):
        if any(stringprep.in_table_d2(ch) for ch in prepared):
            raise ValueError("SASLprep: mixes right-to-left and left-to-right characters")
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            raise ValueError("SASLprep: right-to-left text must start and end right-to-left")
    return prepared


class ClientMechanism(ABC):
    """One client-side SASL exchange; create a fresh object per authentication attempt."""

    name: str

    @abstractmethod
    def initial_response(self) -> bytes | None:
        """Data for <auth/>; None when the mechanism has no initial response."""

    @abstractmethod
    def respond(self, challenge: bytes) -> bytes:
        """Answer one server <challenge/>."""

    @abstractmethod
    def verify_success(self, additional_data: bytes | None) -> None:
        """Check the data of <success/>; SaslError if the server did not prove itself."""

    def __repr__(self) -> str:
        # Never show credentials, nonces or keys, whatever ends up logging us.
        return f"<{type(self).__name__} {self.name}>"


class _MutualAuth(ClientMechanism):
    """One challenge answered with our proof, then the server proves itself: either in a second
    challenge (answered with empty bytes) or in the data of <success/>."""

    _proof_sent = False
    _verified = False

    @abstractmethod
    def _answer(self, challenge: bytes) -> bytes: ...

    @abstractmethod
    def _check_server_proof(self, data: bytes) -> None: ...

    def respond(self, challenge: bytes) -> bytes:
        if not self._proof_sent:
            reply = self._answer(challenge)
            self._proof_sent = True
            return reply
        if self._verified:
            raise SaslError(f"{self.name}: unexpected challenge after the server's proof")
        self._check_server_proof(challenge)
        self._verified = True
        return b""

    def verify_success(self, additional_data: bytes | None) -> None:
        if additional_data:
            if not self._proof_sent:
                raise SaslError(f"{self.name}: success before the client proof was sent")
            self._check_server_proof(additional_data)
            self._verified = True
        # Without the server's proof we may be talking to an impostor that accepts anything.
        if not self._verified:
            raise SaslError(f"{self.name}: server did not prove it knows the password")


def _make_nonce(factory: Callable[[], str] | None) -> str:
    value = factory() if factory is not None else secrets.token_urlsafe(24)
    # Printable ASCII without ',' is safe for both SCRAM attributes and DIGEST quoted strings.
    if not value or not all("\x21" <= ch <= "\x7e" and ch != "," for ch in value):
        raise ValueError("nonce must be non-empty printable ASCII without commas")
    return value


class PlainClient(ClientMechanism):
    """PLAIN (RFC 4616), no authzid. Credentials are sent as given: the server prepares them."""

    name = "PLAIN"

    def __init__(self, username: str, password: str) -> None:
        if "\0" in username or "\0" in password:
            raise ValueError("PLAIN credentials must not contain NUL")
        self._message = b"\0" + username.encode() + b"\0" + password.encode()

    def initial_response(self) -> bytes:
        return self._message

    def respond(self, challenge: bytes) -> bytes:
        raise SaslError("PLAIN does not take challenges")

    def verify_success(self, additional_data: bytes | None) -> None:
        pass  # PLAIN has no server authentication; any additional data carries no meaning


def _parse_attributes(text: str) -> list[tuple[str, str]]:
    attrs = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise SaslError("malformed SCRAM message")
        attrs.append((part[0], part[2:]))
    return attrs


def _b64decode(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SaslError("invalid base64 in SCRAM message") from exc


class ScramClient(_MutualAuth):
    """SCRAM-SHA-1 / SCRAM-SHA-256 without channel binding (gs2 header ``n,,``)."""

    _GS2_HEADER = "n,,"

    def __init__(self, name: str, hash_name: str, username: str, password: str,
                 nonce: Callable[[], str] | None = None) -> None:
        self.name = name
        self._hash = hash_name
        user = saslprep(username).replace("=", "=3D").replace(",", "=2C")
        self._password = saslprep(password).encode()
        self._client_first_bare = f"n={user},r={_make_nonce(nonce)}"
        self._server_signature = b""  # expected v=, known once the proof is computed

    def initial_response(self) -> bytes:
        return (self._GS2_HEADER + self._client_first_bare).encode()

    def _answer(self, challenge: bytes) -> bytes:
        server_first = _decode_utf8(challenge)
        attrs = _parse_attributes(server_first)
        if attrs[0][0] == "e":
            raise SaslError(f"SCRAM server error: {attrs[0][1][:100]}")
        if attrs[0][0] == "m":
            raise SaslError("SCRAM server requires an unsupported extension")
        if len(attrs) < 3 or [key for key, _ in attrs[:3]] != ["r", "s", "i"]:
            raise SaslError("malformed SCRAM server-first-message")
        nonce, salt_b64, iterations_text = (value for _, value in attrs[:3])
        client_nonce = self._client_first_bare.rsplit(",r=", 1)[1]
        # The server must extend our nonce, or it could be replaying an old exchange.
        if not nonce.startswith(client_nonce) or len(nonce) == len(client_nonce):
            raise SaslError("SCRAM server nonce does not extend the client nonce")
        salt = _b64decode(salt_b64)
        if not salt:
            raise SaslError("empty SCRAM salt")
        digits = iterations_text.isascii() and iterations_text.isdigit()  # int() takes "+1", "1_0"
        iterations = int(iterations_text) if digits else 0
        if not 1 <= iterations <= MAX_SCRAM_ITERATIONS:
            raise SaslError("missing or unreasonable SCRAM iteration count")

        channel_binding = base64.b64encode(self._GS2_HEADER.encode()).decode()
        without_proof = f"c={channel_binding},r={nonce}"
        auth_message = f"{self._client_first_bare},{server_first},{without_proof}".encode()
        salted = hashlib.pbkdf2_hmac(self._hash, self._password, salt, iterations)
        client_key = self._hmac(salted, b"Client Key")
        stored_key = hashlib.new(self._hash, client_key).digest()
        signature = self._hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = self._hmac(self._hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def _check_server_proof(self, data: bytes) -> None:
        key, value = _parse_attributes(_decode_utf8(data))[0]
        if key == "e":
            raise SaslError(f"SCRAM server error: {value[:100]}")
        if key != "v":
            raise SaslError("malformed SCRAM server-final-message")
        if not hmac.compare_digest(_b64decode(value), self._server_signature):
            raise SaslError("SCRAM server signature mismatch")

    def _hmac(self, key: bytes, message: bytes) -> bytes:
        return hmac.digest(key, message, self._hash)


def _decode_utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SaslError("SASL message is not valid UTF-8") from exc


_TOKEN = r'[^\x00-\x20()<>@,;:\\"/\[\]?={}\x7f]+'
_DIRECTIVE = re.compile(
    rf'({_TOKEN})[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))[ \t]*(?=,|\Z)', re.DOTALL
)
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)
_SINGLE = frozenset({"nonce", "qop", "charset", "algorithm", "rspauth", "maxbuf", "stale"})


def _parse_directives(data: bytes) -> dict[str, list[str]]:
    """Parse ``key=value, key="quoted"`` lists; values stay as latin-1 strings of raw bytes."""
    text = data.decode("latin-1")  # lossless: values are re-decoded once the charset is known
    directives: dict[str, list[str]] = {}
    pos = 0
    while pos < len(text):
        if text[pos] in ", \t\r\n":  # the #rule allows empty elements and linear white space
            pos += 1
            continue
        match = _DIRECTIVE.match(text, pos)
        if match is None:
            raise SaslError("malformed DIGEST-MD5 directive list")
        key = match.group(1).lower()
        quoted = match.group(2)
        value = match.group(3) if quoted is None else _UNESCAPE.sub(r"\1", quoted)
        directives.setdefault(key, []).append(value)
        if key in _SINGLE and len(directives[key]) > 1:
            raise SaslError(f"DIGEST-MD5 directive {key!r} repeated")
        pos = match.end()
    return directives


def _raw(value: str) -> bytes:
    return value.encode("latin-1")  # undo the lossless decoding of _parse_directives


def _quote(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _latin1_or_utf8(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


class DigestMD5Client(_MutualAuth):
    """DIGEST-MD5 with qop=auth only (no integrity or confidentiality layer), no authzid."""

    name = "DIGEST-MD5"

    def __init__(self, username: str, password: str, *, domain: str, service: str = "xmpp",
                 nonce: Callable[[], str] | None = None) -> None:
        self._username = username
        self._password = password
        self._domain = domain
        self._digest_uri = f"{service}/{domain}".encode()
        self._cnonce = _make_nonce(nonce).encode()
        self._rspauth = ""  # expected rspauth, known once our response is computed

    def initial_response(self) -> None:
        return None

    def _answer(self, challenge: bytes) -> bytes:
        directives = _parse_directives(challenge)
        if "nonce" not in directives or "rspauth" in directives:
            raise SaslError("malformed DIGEST-MD5 challenge")
        qops = [q.strip() for q in directives.get("qop", ["auth"])[0].split(",")]
        if "auth" not in qops:
            raise SaslError("DIGEST-MD5 server does not offer qop=auth")
        if directives.get("algorithm", ["md5-sess"])[0].lower() != "md5-sess":
            raise SaslError("DIGEST-MD5 algorithm is not md5-sess")
        utf8 = directives.get("charset", [""])[0].lower() == "utf-8"
        try:
            realms = [_raw(r).decode("utf-8" if utf8 else "latin-1")
                      for r in directives.get("realm", [])]
        except UnicodeDecodeError as exc:
            raise SaslError("DIGEST-MD5 realm is not valid UTF-8") from exc
        realm = self._domain if not realms or self._domain in realms else realms[0]
        nonce = _raw(directives["nonce"][0])
        # Without charset=utf-8 everything is ISO-8859-1, on the wire and in the hash.
        wire = "utf-8" if utf8 else "latin-1"
        try:
            username, realm_wire = self._username.encode(wire), realm.encode(wire)
            self._password.encode(wire)
        except UnicodeEncodeError as exc:
            raise SaslError("credentials not representable without charset=utf-8") from exc
        # RFC 2831 §2.1.2.1: hash in ISO-8859-1 whenever representable, even with utf-8.
        fields = (self._username, realm, self._password)
        secret = _md5(b":".join(_latin1_or_utf8(field) for field in fields))
        ha1 = _md5(secret + b":" + nonce + b":" + self._cnonce).hex().encode()
        nc, qop = b"00000001", b"auth"

        def kd(a2: bytes) -> str:
            tail = b":".join((nonce, nc, self._cnonce, qop, _md5(a2).hex().encode()))
            return _md5(ha1 + b":" + tail).hex()

        response = kd(b"AUTHENTICATE:" + self._digest_uri)
        self._rspauth = kd(b":" + self._digest_uri)
        parts = [b"charset=utf-8"] if utf8 else []
        parts += [b"username=" + _quote(username), b"realm=" + _quote(realm_wire),
                  b"nonce=" + _quote(nonce), b"nc=" + nc, b"cnonce=" + _quote(self._cnonce),
                  b"digest-uri=" + _quote(self._digest_uri), b"response=" + response.encode(),
                  b"qop=" + qop]
        return b",".join(parts)

    def _check_server_proof(self, data: bytes) -> None:
        values = _parse_directives(data).get("rspauth")
        if not values:
            raise SaslError("DIGEST-MD5 server final message without rspauth")
        if not hmac.compare_digest(_raw(values[0].lower()), self._rspauth.encode()):
            raise SaslError("DIGEST-MD5 rspauth mismatch")


def choose_mechanism(offered: Iterable[str]) -> str | None:
    """The best mechanism of PREFERENCE that is offered; never a channel-binding (-PLUS) one."""
    names = {name.strip().upper() for name in offered}
    return next((name for name in PREFERENCE if name in names), None)


def client_mechanism(name: str, username: str, password: str, *, domain: str,
                     service: str = "xmpp",
                     nonce: Callable[[], str] | None = None) -> ClientMechanism:
    """A fresh client mechanism object; ValueError for an unknown name or unusable input."""
    match name.upper():
        case "PLAIN":
            return PlainClient(username, password)
        case "SCRAM-SHA-1":
            return ScramClient("SCRAM-SHA-1", "sha1", username, password, nonce)
        case "SCRAM-SHA-256":
            return ScramClient("SCRAM-SHA-256", "sha256", username, password, nonce)
        case "DIGEST-MD5":
            return DigestMD5Client(username, password, domain=domain, service=service,
                                   nonce=nonce)
    raise ValueError(f"unsupported SASL mechanism {name!r}")


def parse_plain(message: bytes) -> tuple[str, str, str]:
    """Server side of PLAIN: ``(authzid, authcid, password)``, authzid "" when absent.

    Values are returned unprepared, so they can be relayed as the client typed them; they
    must nonetheless pass SASLprep, since a SCRAM upstream would need that.
    """
    fields = message.split(b"\0")
    if len(fields) != 3:
        raise SaslError("PLAIN message must have exactly three NUL-separated fields")
    authzid, authcid, password = (_decode_utf8(field) for field in fields)
    if not authcid or not password:
        raise SaslError("PLAIN authcid and password must not be empty")
    try:
        saslprep(authcid)
        saslprep(password)
    except ValueError as exc:
        raise SaslError("PLAIN credentials contain prohibited characters") from exc
    return authzid, authcid, password
