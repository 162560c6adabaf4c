"""Scheduling: when policies run.

Nouns: a *calendar expression* (``calendar.Calendar``: systemd-like ``mon..fri 22:30`` or
five-field cron) gives fire times in a time zone — across daylight-saving changes a *time of
day* (``daily 02:30``) fires once (a nonexistent wall time at the end of the gap, a repeated
one at its first occurrence) and a *rhythm* (every hour matches: ``hourly``) follows elapsed
time (the ``calendar`` docstring has the rule); the *scheduler* (``scheduler.Scheduler``)
turns the expressions of each policy into runs through an injected ``Clock``; a *fire* is
one planned time; a fire is *skipped* (coalesced) when the policy's previous run is still
going, and a *misfire* is a fire time that passed while the daemon was down — at most one
catch-up run, and only within the grace window. ``level.choose_level`` picks full /
incremental / differential for one VM from the policy's level rules.

Modules: ``calendar`` (parse once, then the next matching instant), ``scheduler``,
``state`` (``ScheduleState``: each policy's last fire, a JSON file published atomically, so
a restarted daemon knows what it missed), ``clock`` (the ``Clock`` protocol; ``SystemClock``,
and ``FakeClock`` whose virtual time tests advance), ``level``.

Layering: ``engine.sched`` sits just below ``engine.config`` — config imports the calendar
parser to reject bad schedules at load time with file and line; sched never imports config
(the scheduler takes any object with ``name`` and ``calendars``).
"""
