"""Game-state streaming: ship only the pages a frame wrote.

    python examples/game_state_sync.py [--small] [--frames N] [--backend NAME]

A game loop keeps its world in one watched arena, as Windows engines do: a
header (frame number, players), the entities (position, velocity, health;
stored sector by sector for locality) and a tile map. Each frame the players
move, the entities of the sectors around them simulate (the rest sleep) and
the players dig into the tile map. Then GetWriteWatch(WRITE_WATCH_FLAG_RESET)
names the pages the frame wrote, and only those are shipped to a replica (a
save state, a replay recorder, a network peer; a GPU staging buffer is the same
pattern). The replica must equal the arena after every frame.

The same seeded game runs once per writewatch backend available here, and
once on plain memory where, with no write watch, finding what changed means
comparing the whole arena with the previous frame's copy. Printed per run:
pages and bytes shipped against full copies, the frame's simulation time
(on watched memory a first write to a page costs a fault: that is the
tracking's frame-time cost), and the time to find and ship the dirty pages.

Exits 1 if a replica ever differs from its arena.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: docs/semantics.md K19

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass

import numpy as np

import writewatch as ww
from writewatch import backends

P = ww.PAGE_SIZE
ENTITY = np.dtype([("x", "f4"), ("y", "f4"), ("vx", "f4"), ("vy", "f4"), ("health", "f4"),
                   ("state", "u4"), ("sector", "u4"), ("id", "u4")])  # 32 bytes
PLAYER = np.dtype([("x", "f4"), ("y", "f4"), ("vx", "f4"), ("vy", "f4")])


@dataclass(frozen=True)
class World:
    tiles: int  # the map is tiles x tiles uint16
    sector_tiles: int  # sectors are sector_tiles x sector_tiles
    entities: int
    players: int
    frames: int
    dig_radius: int = 2
    active_radius: int = 1  # sectors around a player that simulate


REALISTIC = World(tiles=2048, sector_tiles=64, entities=200_000, players=4, frames=300)
SMALL = World(tiles=256, sector_tiles=32, entities=4096, players=2, frames=40)


class Arena:
    """The world's layout inside one block of memory (watched or plain)."""

    def __init__(self, world: World, memory: np.ndarray) -> None:
        self.world = world
        self.bytes = memory
        self.pages = memory.reshape(-1, P)
        header = 64 + world.players * PLAYER.itemsize
        entity_start = -(-header // P) * P
        tile_start = entity_start + -(-world.entities * ENTITY.itemsize // P) * P
        self.frame = memory[:8].view(np.uint64)
        self.players = memory[64:header].view(PLAYER)
        self.entities = memory[entity_start:entity_start + world.entities * ENTITY.itemsize] \
            .view(ENTITY)
        self.tiles = memory[tile_start:tile_start + world.tiles ** 2 * 2].view(np.uint16) \
            .reshape(world.tiles, world.tiles)

    @staticmethod
    def size(world: World) -> int:
        header = -(-(64 + world.players * PLAYER.itemsize) // P) * P
        entities = -(-world.entities * ENTITY.itemsize // P) * P
        return header + entities + -(-world.tiles ** 2 * 2 // P) * P


class Game:
    """The simulation: deterministic for a seed, whatever memory it runs in."""

    def __init__(self, world: World, arena: Arena, seed: int) -> None:
        self.world, self.arena = world, arena
        self.rng = np.random.default_rng(seed)
        self.sectors_per_side = world.tiles // world.sector_tiles
        sectors = self.sectors_per_side ** 2
        # Entities sorted by sector: sector s owns entities [first[s], first[s+1]).
        sector_of = np.sort(self.rng.integers(0, sectors, world.entities))
        self.first = np.searchsorted(sector_of, np.arange(sectors + 1))
        entities = arena.entities
        entities["sector"] = sector_of
        entities["id"] = np.arange(world.entities)
        self.sector_x = (sector_of % self.sectors_per_side) * world.sector_tiles
        self.sector_y = (sector_of // self.sectors_per_side) * world.sector_tiles
        entities["x"] = self.sector_x + self.rng.random(world.entities) * world.sector_tiles
        entities["y"] = self.sector_y + self.rng.random(world.entities) * world.sector_tiles
        entities["vx"] = self.rng.normal(0, 0.5, world.entities)
        entities["vy"] = self.rng.normal(0, 0.5, world.entities)
        entities["health"] = 100
        arena.tiles[:] = self.rng.integers(1, 8, arena.tiles.shape, dtype=np.uint16)
        players = arena.players
        players["x"] = self.rng.random(world.players) * world.tiles
        players["y"] = self.rng.random(world.players) * world.tiles
        players["vx"] = self.rng.normal(0, 2, world.players)
        players["vy"] = self.rng.normal(0, 2, world.players)

    def active_entities(self) -> np.ndarray:
        """Entities of the sectors within active_radius of a player."""
        world, side = self.world, self.sectors_per_side
        players = self.arena.players
        centre_x = (players["x"] // world.sector_tiles).astype(int)
        centre_y = (players["y"] // world.sector_tiles).astype(int)
        reach = np.arange(-world.active_radius, world.active_radius + 1)
        xs = np.clip(centre_x[:, None, None] + reach[None, None, :], 0, side - 1)
        ys = np.clip(centre_y[:, None, None] + reach[None, :, None], 0, side - 1)
        sectors = np.unique((ys * side + xs).ravel())
        starts, ends = self.first[sectors], self.first[sectors + 1]
        return np.concatenate([np.arange(a, b) for a, b in zip(starts, ends, strict=True)] or
                              [np.empty(0, int)])

    def step(self) -> None:
        world, arena, rng = self.world, self.arena, self.rng
        arena.frame[0] += 1
        players = arena.players
        players["vx"] = np.clip(players["vx"] + rng.normal(0, 0.3, world.players), -3, 3)
        players["vy"] = np.clip(players["vy"] + rng.normal(0, 0.3, world.players), -3, 3)
        players["x"] = np.clip(players["x"] + players["vx"], 0, world.tiles - 1)
        players["y"] = np.clip(players["y"] + players["vy"], 0, world.tiles - 1)

        # Awake entities move and bounce inside their sector; sleeping ones are
        # not touched at all, so their pages stay clean.
        awake = self.active_entities()
        if awake.size:
            entities = arena.entities
            x = entities["x"][awake] + entities["vx"][awake]
            y = entities["y"][awake] + entities["vy"][awake]
            low_x, low_y = self.sector_x[awake], self.sector_y[awake]
            high_x, high_y = low_x + world.sector_tiles - 1, low_y + world.sector_tiles - 1
            bounce_x = (x < low_x) | (x > high_x)
            bounce_y = (y < low_y) | (y > high_y)
            entities["vx"][awake[bounce_x]] *= -1
            entities["vy"][awake[bounce_y]] *= -1
            entities["x"][awake] = np.clip(x, low_x, high_x)
            entities["y"][awake] = np.clip(y, low_y, high_y)
            hurt = awake[rng.random(awake.size) < 0.05]
            entities["health"][hurt] -= 1

        # Each player digs the tiles around it.
        radius = world.dig_radius
        for x, y in zip(players["x"].astype(int), players["y"].astype(int), strict=True):
            arena.tiles[max(y - radius, 0):y + radius + 1, max(x - radius, 0):x + radius + 1] = \
                arena.frame[0] % 7

    def digest(self) -> str:
        return hashlib.sha256(self.arena.bytes.tobytes()).hexdigest()[:16]


@dataclass
class Figures:
    name: str
    frames: int = 0
    pages: int = 0  # arena pages
    shipped_pages: int = 0
    simulate: float = 0.0  # seconds in the game's own step
    find_dirty: float = 0.0  # GetWriteWatch, or diffing against a copy
    ship: float = 0.0  # copying the dirty pages into the replica
    mismatches: int = 0
    digest: str = ""


def run_watched(world: World, backend: str, seed: int) -> Figures:
    figures = Figures(backend, frames=world.frames)
    with ww.WatchedMemory(Arena.size(world), backend=backend) as memory:
        arena = Arena(world, memory.array)
        game = Game(world, arena, seed)
        figures.pages = memory.size // P
        addresses = np.zeros(figures.pages, np.uintp)
        replica = arena.bytes.copy()  # the keyframe: one full copy
        replica_pages = replica.reshape(-1, P)
        if ww.ResetWriteWatch(memory.address, memory.size) != 0:
            raise OSError(f"ResetWriteWatch failed with error {ww.GetLastError()}")
        for _ in range(world.frames):
            started = time.perf_counter()
            game.step()
            stepped = time.perf_counter()
            ret, count, _ = ww.GetWriteWatch(ww.WRITE_WATCH_FLAG_RESET, memory.address,
                                             memory.size, addresses)
            if ret != 0:
                raise OSError(f"GetWriteWatch failed with error {ww.GetLastError()}")
            found = time.perf_counter()
            dirty = ((addresses[:count] - memory.address) // P).astype(np.int64)
            replica_pages[dirty] = arena.pages[dirty]  # the shipment, applied
            shipped = time.perf_counter()
            figures.simulate += stepped - started
            figures.find_dirty += found - stepped
            figures.ship += shipped - found
            figures.shipped_pages += count
            figures.mismatches += not np.array_equal(replica, arena.bytes)
        figures.digest = game.digest()
    return figures


def run_plain(world: World, seed: int) -> Figures:
    """No write watch: find the changed pages by comparing with last frame's copy."""
    figures = Figures("plain", frames=world.frames)
    memory = np.zeros(Arena.size(world), np.uint8)
    arena = Arena(world, memory)
    game = Game(world, arena, seed)
    figures.pages = memory.size // P
    replica = memory.copy()
    replica_pages = replica.reshape(-1, P)
    for _ in range(world.frames):
        started = time.perf_counter()
        game.step()
        stepped = time.perf_counter()
        dirty = np.flatnonzero((arena.pages != replica_pages).any(axis=1))
        found = time.perf_counter()
        replica_pages[dirty] = arena.pages[dirty]
        shipped = time.perf_counter()
        figures.simulate += stepped - started
        figures.find_dirty += found - stepped
        figures.ship += shipped - found
        figures.shipped_pages += dirty.size
        figures.mismatches += not np.array_equal(replica, memory)
    figures.digest = game.digest()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a small world (for tests)")
    parser.add_argument("--frames", type=int, help="frames to run")
    parser.add_argument("--backend", help="run on this backend only (default: every one here)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    world = SMALL if args.small else REALISTIC
    if args.frames:
        world = World(**{**world.__dict__, "frames": args.frames})
    size = Arena.size(world)
    print(f"World: {world.tiles}x{world.tiles} tiles, {world.entities} entities in "
          f"{(world.tiles // world.sector_tiles) ** 2} sectors, {world.players} players; "
          f"arena {size / 2**20:.2f} MiB ({size // P} pages); {world.frames} frames")

    status = backends.backend_status()
    names = [args.backend] if args.backend else backends.backend_names()
    run_plain(World(**{**world.__dict__, "frames": min(world.frames, 10)}), args.seed)  # warm up
    runs = [run_plain(world, args.seed)]
    for name in names:
        if status.get(name, "unknown backend"):
            print(f"  {name}: skipped ({status.get(name, 'unknown backend')})")
            continue
        runs.append(run_watched(world, name, args.seed))

    full_copy = size * world.frames
    baseline = runs[0].simulate / world.frames
    print(f"{'memory':<9} {'pages/frame':>11} {'shipped':>20} {'simulate':>10} "
          f"{'tracking':>9} {'find dirty':>11} {'ship':>9}  replica")
    for run in runs:
        simulate = run.simulate / run.frames
        cost = "" if run is runs[0] else f"{(simulate - baseline) * 1e3:+.2f} ms"
        shipped = run.shipped_pages * P
        replica = "equal every frame" if not run.mismatches else \
            f"DIFFERED in {run.mismatches} frames"
        print(f"{run.name:<9} {run.shipped_pages / run.frames:>11.1f} "
              f"{shipped / 2**20:>8.1f} MiB ({shipped / full_copy:>6.2%}) "
              f"{simulate * 1e3:>7.2f} ms {cost:>9} {run.find_dirty / run.frames * 1e6:>8.0f} us "
              f"{run.ship / run.frames * 1e6:>6.0f} us  {replica}")
    print(f"Figures per frame, but 'shipped': all frames (full copies: {full_copy / 2**20:.1f} "
          "MiB).\n'plain' has no write watch: it finds the changed pages by comparing the "
          "arena with\nlast frame's copy. 'tracking': what write watch adds to the frame's "
          "simulation (faults).")

    failed = [run.name for run in runs if run.mismatches]
    digests = {run.digest for run in runs}
    if len(digests) != 1:
        failed.append("the final worlds differ between runs")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print(f"OK: every replica equalled its arena after each of {world.frames} frames, "
          f"and every run ended in the same world ({digests.pop()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
