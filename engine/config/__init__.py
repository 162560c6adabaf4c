"""Configuration: YAML files → frozen typed models, once, at the edge.

``models`` holds the msgspec structs (unknown keys are rejected); ``loader`` reads
``config.yaml`` plus ``conf.d/*.yaml`` drop-ins (merged by section, in file-name order) and
turns every problem into a ``ConfigError`` naming the file, the key path and the line:
``/etc/tessera/config.yaml: stores[0].chunk_size (line 7): expected int, got str``.
Secrets are never values here: only ``*_file`` paths.

This slice covers the sections the CLI uses today (stores, engines, datamover); policies,
schedules, API, logging, SMTP and peers arrive with the service issue.
"""
