"""The clipboard protocol: messages and the sans-IO state machines of both ends.

Pure code: no sockets, mmap, threads, clocks or cffi.  Callers pass records in,
take records and events out, and pass the time in explicitly.
"""
