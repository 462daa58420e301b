"""Test and fault harnesses that drive a running mesh from outside; not part of the serving
library (``pdmesh``), which never imports them.

- ``chaos``: the chaos and soak runs' load, outcomes, ``/proc`` samples and reports;
- ``testbed``: many hosts on one machine (network namespaces) for ``tests/multihost``;
- ``kv_receiver``: a KV receiver in a child process, so a sender can be measured or tested
  against a peer that does not share its interpreter.
"""
