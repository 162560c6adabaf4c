"""Disk I/O every source and target uses: direct reads and writes of raw images, an NBD
client, qemu process wrappers and the journaled NBD exports.

Modules: ``direct`` (a raw file or block device read in place with ``preadv``, no server:
local raw images and the DataMover's devices), ``direct_write`` (its mirror for restores into
local raw images: ``pwritev``, holes punched for zeroes), ``nbd`` (the sans-IO NBD protocol and its
asyncio client), ``qemu`` (qemu-img commands; ``QemuNbd`` and ``NbdServerProcess``: a server
on a unix socket in a private directory, for formats that need qemu: qcow2), ``exports``
(those servers as a job journals them, and how recovery stops what a killed job left, found
by directory: used by ``plugins.local`` and ``plugins.ovirt``), ``s3`` (the few S3 calls
the store's packs need, over botocore: the only module that imports it).

Nouns: an *export* is a disk served over NBD (its size, block size constraints and flags come
from the handshake); an *extent* (``engine.core.extent.Extent``) is a byte range with zero /
hole / dirty flags from NBD block status (or, read directly, from a file's holes); a
*metadata context* is the kind of block status asked for (``base:allocation`` for
zero/hole, ``qemu:dirty-bitmap:NAME`` for changed ranges).

Invariants: every direct read or write runs on its reader's or writer's thread, never on
the event loop, and uses the caller's buffer in place; every NBD request size is bounded
(``nbd.protocol.MAX_REQUEST``), every wait on a server or process is bounded by a named
timeout, every process started here is reaped and every temporary directory removed, also
on errors and cancellation. A server process dies
with the process that started it (``PR_SET_PDEATHSIG``), and its private directory exists
before it does, so a job can journal it and recovery can find what a killed job left.
"""
