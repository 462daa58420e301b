"""The parts of the chaos and soak runs that do not start processes (tests/chaos does that):

- ``load``: steady closed-loop load through the gateway with the load generator's OpenAI
  backend (``benchmarks.serve``), every request's outcome recorded with its times, optional
  client cancellations;
- ``outcomes``: what happened to the requests around a fault (in flight, completed, failed with
  which reason, past their deadline);
- ``procstats``: RSS, open file descriptors and threads of a process from ``/proc``, and whether
  a series of them stayed flat;
- ``report``: the markdown table of a chaos run and the series of a soak run.
"""
