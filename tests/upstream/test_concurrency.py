"""Concurrent writes: ids stay unique and no request fails under contention."""

import asyncio


async def test_200_concurrent_ticket_creates_get_200_distinct_ids(api) -> None:
    """200 simultaneous POST /api/tickets all succeed with distinct ids."""

    async def create(n: int) -> int:
        created = await api.create("tickets", {"title": f"ticket {n}"})
        return int(created["id"])

    ids = await asyncio.gather(*(create(n) for n in range(200)))
    assert len(set(ids)) == 200
    page = await api.json("GET", "/api/tickets?limit=1", 200)
    assert page["total"] == 200


async def test_concurrent_reads_and_writes_interleave(api) -> None:
    """Reads running beside writes see only complete rows."""
    first = await api.create("tickets", {"title": "seed"})

    async def read() -> None:
        await api.json("GET", f"/api/tickets/{first['id']}", 200)

    async def write(n: int) -> None:
        await api.json("PATCH", f"/api/tickets/{first['id']}", 200, json={"title": f"t{n}"})

    await asyncio.gather(*(read() for _ in range(50)), *(write(n) for n in range(50)))
