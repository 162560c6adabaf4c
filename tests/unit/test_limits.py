"""Named limits: weighted holds, name-ordered multi-holds without deadlock, statistics."""

import asyncio

import pytest

from engine.util.limits import Limit, Limits


async def test_weighted_hold_waits_for_room_and_counts() -> None:
    limit = Limit("transfers/host/h1", 4)
    order: list[str] = []
    release = asyncio.Event()

    async def job(name: str, units: int) -> None:
        async with limit.hold(units):
            order.append(f"{name}+")
            await release.wait()
            order.append(f"{name}-")

    a = asyncio.create_task(job("a", 3))
    await asyncio.sleep(0)
    b = asyncio.create_task(job("b", 2))  # 3 + 2 > 4: waits for a
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == ["a+"] and limit.waiting == 1 and limit.in_use == 3
    release.set()
    await asyncio.gather(a, b)
    assert order == ["a+", "a-", "b+", "b-"]
    assert limit.stats() | {"waited_seconds": 0} == {
        "name": "transfers/host/h1",
        "capacity": 4,
        "in_use": 0,
        "waiting": 0,
        "peak": 3,
        "acquired": 2,
        "waited_seconds": 0,
    }


async def test_more_units_than_the_capacity_are_cut_so_nothing_waits_forever() -> None:
    limit = Limit("transfers/sd/s1", 2)
    async with limit.hold(7) as held:
        assert held == 2 and limit.in_use == 2
    assert limit.in_use == 0


async def test_multi_holds_in_name_order_never_deadlock() -> None:
    limits = Limits({"transfers/host": 1, "transfers/sd": 1})
    done: list[int] = []

    async def job(i: int, needs: dict[str, int]) -> None:
        async with limits.hold(needs):
            await asyncio.sleep(0)
            done.append(i)

    # Opposite orders in the requests: taken in name order, both finish.
    await asyncio.wait_for(
        asyncio.gather(
            *(
                job(
                    i,
                    {"transfers/host/h1": 1, "transfers/sd/s1": 1}
                    if i % 2
                    else {"transfers/sd/s1": 1, "transfers/host/h1": 1},
                )
                for i in range(20)
            )
        ),
        timeout=10,
    )
    assert sorted(done) == list(range(20))
    assert [s["name"] for s in limits.stats()] == ["transfers/host/h1", "transfers/sd/s1"]
    assert all(s["peak"] == 1 for s in limits.stats())


def test_unknown_family_and_bad_capacity_are_refused() -> None:
    with pytest.raises(KeyError, match="nope"):
        Limits({}).get("nope/x")
    with pytest.raises(ValueError, match="capacity must be"):
        Limit("x", 0)
