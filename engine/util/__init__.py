"""Small mechanisms used by every layer; they import only ``engine.core`` and each other.

- ``fs``          durable files: ``atomic_write`` (tmp + fsync + rename + fsync dir), full
                  writes at explicit offsets, temporary files found again by recovery.
- ``failpoints``  named places where crash and fault tests stop or fail the process.
- ``retry``       the one place retry loops live (transient errors, backoff with jitter).
- ``limits``      named weighted semaphores with statistics (``Limit``, ``Limits``).
- ``tasks``       ``run_group``: a TaskGroup whose first failure is raised as itself.
- ``aio``         ``run``: a command's top-level coroutine on uvloop.
"""
