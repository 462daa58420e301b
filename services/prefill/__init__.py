"""An alias package: ``python -m services.prefill`` runs ``services.worker --mode prefill``."""
