"""Finding services: ``static`` address lists and ``consul`` — arrives with the Consul issue.

Until then services take explicit ``host:port`` flags.
"""
