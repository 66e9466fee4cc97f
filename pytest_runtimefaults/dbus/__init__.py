"""D-Bus pieces: the wire codec, SASL relay, fault rules, the proxy and a private bus."""
