"""Replication between sites: push one snapshot's missing chunks, then its manifest.

Nouns: a *peer* is another Tessera site; a *session* is one snapshot pushed to one peer;
the *sender* reads its store, the *receiver* writes its own. Stores that replicate share
id-key and MAC key (``Store.init(keys=...)``, ``tessera peer init-store``), so chunk ids
compare and records ship exactly as stored, still encrypted; a receiver without the data
key (*encrypted-only*) checks CRCs, stores and serves records back, and cannot read them.

Protocol (HTTPS, mutual TLS with the sites' own CA; routes under ``/peer/v1``)::

    sender                                              receiver
      │ POST sessions {snapshot, keys fp, base} ───────▶ checks keys, chunk size; lease
      │ ◀──────────────────────────── {session, committed?, base held?}
      │ candidates = ids of the snapshot that differ from the base at their slot
      │ POST lacking [ids]  (batches of 4096) ─────────▶ has()?
      │ ◀───────────────────────────────────── [ids it lacks]
      │ POST records  (≤16 MiB, N streams, bucket) ────▶ CRC (+ decode, re-hash if keyed)
      │                                                  → Store.put → flush (durable)
      │ ◀───────────────────────────────────── {records, stored, existing} | 422 refused
      │ PUT diskmaps/<name> … ─────────────────────────▶ staged .tmp, fsynced
      │ POST commit (manifest bytes) ──────────────────▶ MAC, DiskMap checksums, every
      │ ◀───────────────────────────────────── {committed}   chunk indexed → manifest last

Pull: ``POST /peer/v1/pull`` (``sender.request_pull``) asks a peer to push this site the
newest snapshot of the VMs it names; the peer's daemon (``on_pull`` of ``build_peer_app``)
answers with the ``replicate`` jobs it started. A receiver reports each committed snapshot
to ``on_commit`` (the daemon's standby refreshes).

Invariants: the receiver never deletes anything it holds; a manifest is committed only
when every chunk it names is indexed there; a batch is answered only once what arrived is
durable, so resuming (a retry, a new session after a receiver restart, or a new job after
a sender restart) re-asks ``lacking`` and sends only the rest; a record damaged in transit
(CRC) is never put, its batch is resent; one damaged in the sender's own pack fails the job
(integrity errors are not retried).

Modules: ``protocol`` (routes, bounds, messages), ``tls`` (CA, site certificates, ssl
contexts), ``throttle`` (token bucket), ``state`` (last snapshot replicated per peer and
VM), ``sender`` (``Sender``, ``request_pull``), ``receiver`` (``build_peer_app``,
``PeerServer``), ``job`` (``run_replication``, the state machine).
"""
