"""The benchmark harness of xmpp-front (not part of the test run): ``python -m bench``."""
