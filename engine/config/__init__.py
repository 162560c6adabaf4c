"""Configuration: YAML files → frozen typed models, once, at the edge.

``models`` holds the msgspec structs (unknown keys are rejected); ``loader`` reads
``config.yaml`` plus ``conf.d/*.yaml`` drop-ins (merged by section, in file-name order) and
turns every problem into a ``ConfigError`` naming the file, the key path and the line:
``/etc/tessera/config.yaml: stores[0].chunk_size (line 7): expected int, got str``.
Secrets are never values here: only ``*_file`` paths.

``policy`` holds the policy models (``policies.d/*.yaml``, one per file) and ``types`` the
parsed field values (``Duration``, ``Schedule``, ``ByteSize``). ``loader.load_all`` reads the
daemon config, its drop-ins and the policies and checks the names they share.
"""
