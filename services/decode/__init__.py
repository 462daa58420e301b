"""An alias package: ``python -m services.decode`` runs ``services.worker`` (aggregated or
``--mode decode``)."""
