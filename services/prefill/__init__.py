"""The prefill service (``services.prefill``) arrives with the PD-disaggregation issue: a
prefill-only engine plus the bootstrap server that decode workers register with. Until then a
worker runs aggregated (``python -m services.decode --mode aggregated``)."""
