"""XML namespaces used on the wire (RFC 6120, RFC 6121 and the XEPs xmpp-front speaks)."""

from typing import Final

CLIENT: Final = "jabber:client"
STREAM: Final = "http://etherx.jabber.org/streams"
STREAMS_ERRORS: Final = "urn:ietf:params:xml:ns:xmpp-streams"
STANZA_ERRORS: Final = "urn:ietf:params:xml:ns:xmpp-stanzas"
TLS: Final = "urn:ietf:params:xml:ns:xmpp-tls"
SASL: Final = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND: Final = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION: Final = "urn:ietf:params:xml:ns:xmpp-session"
ROSTER: Final = "jabber:iq:roster"
ROSTER_VER: Final = "urn:xmpp:features:rosterver"
PRE_APPROVAL: Final = "urn:xmpp:features:pre-approval"
SM: Final = "urn:xmpp:sm:3"
CSI: Final = "urn:xmpp:csi:0"
PING: Final = "urn:xmpp:ping"
DISCO_INFO: Final = "http://jabber.org/protocol/disco#info"
CAPS: Final = "http://jabber.org/protocol/caps"  # XEP-0115 entity capabilities
DELAY: Final = "urn:xmpp:delay"
SID: Final = "urn:xmpp:sid:0"  # XEP-0359 unique and stable stanza ids
MUC: Final = "http://jabber.org/protocol/muc"
MUC_USER: Final = "http://jabber.org/protocol/muc#user"


def qname(namespace: str, local: str) -> str:
    """Clark notation, as lxml names elements: ``{namespace}local``."""
    return f"{{{namespace}}}{local}"
