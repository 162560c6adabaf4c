"""Store maintenance: retention (pure), prune and protect, space accounting, garbage
collection, check, verify and repair.

Nouns: a *rule* set (``retention.Rules``) says which snapshots to keep; a *plan* is one
``Decision`` (keep or remove, with reasons) per snapshot; *pruning* removes the snapshots a
plan does not keep — their manifests, never chunks: the chunks become garbage for GC, which
runs separately (DESIGN §4.9). A removed snapshot waits in ``STORE/removed/`` for GC's grace
period (the undo window). A *protected* snapshot is never removed.

Modules: ``retention`` (pure planning), ``prune`` (protect, remove, undo; the prune lock),
``usage`` (space per snapshot, VM and store, with bounded memory), ``gc`` (condemn-then-
delete beside backups under leases, repack, trash with a grace period; the protocol is in
the ``engine.store`` docstring; ``gc_defaults``: its grace and repack threshold, importable
without it), ``check`` (the structure and data check that reads
through a ``Store``; no side effects), ``verify`` (``check`` sampled oldest-first and
resumable; writes the damage marks (``engine.store.damage``) and the bad-chunk list that the
next backup heals), ``repair`` (the index rebuilt from the packs, packs with a damaged
trailer re-sealed, packs without an intact record moved to ``quarantine/``).

This package sits above ``engine.store`` and below ``engine.jobs`` / ``engine.daemon``.
"""
