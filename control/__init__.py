"""Local control sockets: the broker's gesture socket and the guest driver's clipboard socket.

Framing is sans-IO (:mod:`control.framing`); the socket plumbing, owner-only
permissions and peer-credential checks live in :mod:`control.sockets`.
"""
