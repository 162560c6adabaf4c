"""Jobs: one run of backup / restore (later replicate, retention, gc, verify).

Every job is a table-driven state machine (``states``: one module owns the tables; illegal
transitions raise). The ``driver`` persists the new state in the ``journal`` *before* acting
on it, so a process killed at any instant leaves a record saying what it was doing and what
it had created (``resources``: exports, bitmaps, target files). At the next start,
``recover_unfinished`` hands each unfinished record to its kind's recovery, which finishes
(the snapshot was committed) or cleans up (it was not). Every job ends with one summary line.
"""
